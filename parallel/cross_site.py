"""The outer loop of training across sites (DiLoCo): every `cross_site.every` inner steps each rank sends
the change of the ZeRO-3 partition it owns, and applies one outer Nesterov-SGD step to the average.

A site is an ordinary ZeRO-3 job. Rank r of every site owns the same slice of every parameter (same model,
same layout: checked at the rendezvous), so rank r exchanges only with rank r of the other sites, over the
TCP store of `cross_site_store`, and no rank ever holds more than its partition. Per round, on each rank:

    delta  = synced - current              the pseudo-gradient of this rank's fp32 partition
    delta *= min(1, dp_clip / ||delta||)   norm over the whole site (one all-reduce of a float)
    delta += N(0, (dp_noise * dp_clip)^2)  from a fresh secret per release (never stored or sent)
    sent   = decode(encode(delta + residual))        none | fp16 | int8 | sign; int8, sign: error feedback
    avg    = mean of `sent` over the round's member sites (each site averages the same stored bytes)
    m      = mu * m + avg;  synced -= outer_lr * (avg + mu * m)      (Nesterov; mu = 0: plain SGD)
    current = synced                       fp32 master partition and the working copy the forward reads

Every site holds the same `synced` and `m` after a round (same members, same bytes, same arithmetic), so
the outer state needs no coordinator; a site that (re)joins copies it from a member. The inner AdamW state
stays each site's own, as in DiLoCo.
"""

from __future__ import annotations

import logging
import secrets
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from parallel import cross_site_join, groups
from parallel.consensus import from_rank0, sum_over_ranks
from parallel.cross_site_codec import ErrorFeedback, decode
from parallel.cross_site_join import every_rank, rank0
from parallel.cross_site_link import read_secret
from parallel.cross_site_names import holds_name, taken_over
from parallel.cross_site_privacy import PrivacyLedger, clip_scale, gaussian_noise, noise_change, noise_seed
from parallel.cross_site_state import RELEASES_FILE, ReleaseLog, digest, foreign_checkpoint
from parallel.cross_site_store import Behind, CrossSiteError, Heartbeat, Rendezvous, StoreGone, open_store
from parallel.settings import CrossSiteConfig

log = logging.getLogger("mmpt.cross_site")


class Partition:
    """This rank's share of the trainable parameters as one flat fp32 vector: ZeRO-3's local fp32 master
    partitions (what the optimizer updates), in `parameters()` order."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.params = [p for p in module.parameters() if p.requires_grad]
        missing = [n for n, p in module.named_parameters() if p.requires_grad and not hasattr(p, "ds_id")]
        if missing:
            raise CrossSiteError(f"cross_site needs ZeRO-3 partitioned parameters; {missing[0]} is not "
                                 "(parallel.zero_stage=3)")
        self.sizes = [p.ds_tensor.numel() for p in self.params]
        # ZeRO-3 pads each parameter to a multiple of the data-parallel size and leaves the padding of the
        # last partition uninitialised (torch.empty): garbage that differs between sites and runs (and may
        # be NaN). Read as 0, it is 0 on every site, and `synced` has the same bytes wherever it is the same
        # model (its digest is compared between sites).
        rank, pads, offset = groups.dp_rank(), [], 0
        for p, size in zip(self.params, self.sizes):
            real = max(0, min(size, int(p.ds_numel) - size * rank))
            pads.extend(range(offset + real, offset + size))
            offset += size
        self.padding = torch.tensor(pads, dtype=torch.long)

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    @torch.no_grad()
    def read(self) -> torch.Tensor:
        from deepspeed.utils import safe_get_local_fp32_param

        flat = torch.cat([safe_get_local_fp32_param(p).reshape(-1).float() for p in self.params])
        if self.padding.numel():
            flat[self.padding.to(flat.device)] = 0.0
        return flat

    @torch.no_grad()
    def write(self, flat: torch.Tensor) -> None:
        """Put `flat` into the fp32 master partitions and the working partitions (as clamp_parameter_ does);
        parameters ZeRO-3 keeps whole on every rank (the persistence threshold) are re-gathered."""
        from deepspeed.utils import safe_set_local_fp32_param

        group = groups.get_data_parallel_group()
        dp = groups.dp_world_size()
        for p, part in zip(self.params, torch.split(flat, self.sizes)):
            safe_set_local_fp32_param(p, part.to(p.ds_tensor.device))
            p.ds_tensor.data.copy_(part.view_as(p.ds_tensor))
            if p.data.numel():  # persistent: every rank's working copy is the whole parameter
                pieces = [torch.empty_like(p.ds_tensor) for _ in range(dp)]
                if dp > 1:
                    dist.all_gather(pieces, p.ds_tensor.data, group=group)
                else:
                    pieces = [p.ds_tensor.data]
                p.data.copy_(torch.cat(pieces)[: p.data.numel()].view_as(p.data))


def contribution(data: bytes | None, numel: int, where: str, rendezvous: str) -> torch.Tensor:
    """Another site's decoded payload for this rank, or a CrossSiteError that says `where` (round, site,
    rank) and what is wrong: gone from the store, truncated or corrupted, sized for another partition, or
    holding NaN or inf (averaged in, one such value would make every site's weights NaN)."""
    if data is None:
        raise CrossSiteError(f"{where} is gone from {rendezvous} (this site is more than 3 rounds behind)")
    try:
        got = decode(data)
    except ValueError as e:
        raise CrossSiteError(f"{where}: {e}") from None
    if got.numel() != numel:
        raise CrossSiteError(f"{where} has {got.numel()} values, this rank's partition {numel}")
    bad = int((~torch.isfinite(got)).sum())
    if bad:
        raise CrossSiteError(f"{where} has {bad} NaN or inf values (of {numel}): that site's training "
                             "diverged or its payload is corrupted; it is not averaged in")
    return got


class OuterLoop:
    """One site's outer loop on one rank. Every rank of the site calls every method at the same step."""

    def __init__(self, cfg: CrossSiteConfig, module: torch.nn.Module | None, fingerprint: dict[str, Any],
                 device: torch.device, run_dir: Path | None = None, partition: Any = None) -> None:
        """`run_dir`: where rank 0 records each released round before it posts (epsilon must not forget
        rounds sent after the last checkpoint); `partition`: stands in for ZeRO-3's (single-process tests)."""
        self.cfg, self.device = cfg, device
        self.rank = groups.rank()
        self.partition = partition if partition is not None else Partition(module)  # type: ignore[arg-type]
        secret = read_secret(cfg.secret_file)
        store, self.hosting = open_store(cfg.rendezvous, cfg.timeout_s, self.rank == 0, secret)
        if self.hosting:
            log.info("cross-site: site %s serves the rendezvous store at %s", cfg.site, cfg.rendezvous)
        self.rv = Rendezvous(store, cfg.site, self.rank, cfg.rendezvous, cfg.timeout_s, cfg.sites)
        self.fingerprint = {**fingerprint, "partition_numel_rank0": from_rank0(self.partition.numel)}
        record = run_dir / RELEASES_FILE if run_dir is not None and self.rank == 0 else None
        self.releases = ReleaseLog(record)
        self.synced = self.partition.read()
        self.momentum = torch.zeros_like(self.synced)
        self.feedback = ErrorFeedback(cfg.compress, self.synced.numel(), self.synced.device)
        self.ledger = PrivacyLedger(cfg.dp_noise, cfg.dp_delta)
        self.round, self.bytes_rank, self.bytes_site = 0, 0, 0
        self.generation = ""  # of the outer state this rank holds ("": none, or a checkpoint from before)
        self.heartbeat: Heartbeat | None = None
        self.last: dict[str, Any] = {}
        self._first_round = True
        self.diverged = False  # this site's digest after the last round differs from the sites'
        self.others_done = False  # at the last round, every other site had finished
        self.solo = False  # the store is gone after the others finished: outer steps alone
        self.nonce = secrets.token_hex(8)  # this process, as the holder of the site's name at the store

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """This rank's outer state for its checkpoint file (ZeRO-3: one file per rank)."""
        return {"site": self.cfg.site, "round": self.round, "synced": self.synced.cpu(),
                "momentum": self.momentum.cpu(), "residual": self.feedback.residual.cpu(),
                "dp_rounds": self.ledger.rounds, "dp_noise": self.cfg.dp_noise,
                "bytes_rank": self.bytes_rank, "bytes_site": self.bytes_site,
                "generation": self.rv.generation or self.generation}

    def load_state_dict(self, state: dict[str, Any]) -> bool:
        """Restore a checkpoint's outer state; False (and nothing changed) when it is for another layout; a
        CrossSiteError for another site's checkpoint (why refused, not reset: `foreign_checkpoint`)."""
        refused = foreign_checkpoint(state, self.cfg.site)
        if refused:
            raise CrossSiteError(refused)
        if state["synced"].numel() != self.synced.numel():
            log.warning("cross-site: the checkpoint's outer state has %d values per rank, this layout %d; "
                        "starting the outer state from the current weights", state["synced"].numel(),
                        self.synced.numel())
            return False
        refused = noise_change(state, self.cfg.dp_noise)
        if refused:
            raise CrossSiteError(f"site {self.cfg.site}: {refused}")
        self.synced = state["synced"].to(self.synced.device)
        self.momentum = state["momentum"].to(self.synced.device)
        if state["residual"].numel() == self.feedback.residual.numel():
            self.feedback.residual = state["residual"].to(self.synced.device)
        self.round, self.ledger.rounds = int(state["round"]), int(state.get("dp_rounds", 0))
        self.bytes_rank, self.bytes_site = int(state.get("bytes_rank", 0)), int(state.get("bytes_site", 0))
        self.generation = str(state.get("generation", ""))
        return True

    def _adopt(self, state: dict[str, Any]) -> None:
        """Take a member site's outer state (synced weights, momentum, round; checked by the caller) and
        train on from it."""
        self.synced = state["synced"].to(self.synced.device)
        self.momentum = state["momentum"].to(self.synced.device)
        self.round = int(state["round"])
        self.feedback.residual.zero_()
        self.partition.write(self.synced)
        self.generation, self.diverged = self.rv.generation, False

    def join(self) -> None:
        """Before the first step: enter the sites' current outer state (continue from this site's own when
        it is the recorded one, else take a running member's, else start a new generation from it:
        cross_site_join), then register and start the heartbeat."""
        cross_site_join.join(self)

    # ------------------------------------------------------------------ rounds
    def after_step(self, step: int) -> dict[str, Any] | None:
        """Call after every optimizer step; runs a round every `cross_site.every` steps and returns its
        metrics (None between rounds)."""
        if step % self.cfg.every:
            return None
        return self._round()

    def _release(self, delta: torch.Tensor, k: int) -> torch.Tensor:
        """What may leave the site: clipped over the whole site's model, then noised (dp_* settings), with
        noise from a fresh secret that is used once and kept nowhere (cross_site_privacy).

        A pseudo-gradient with NaN or inf on any rank is refused on every rank of the site at once (one
        all-reduce of two floats, shared with clipping's norm, so no rank posts while another stops): it
        means this site's own training diverged since the last round, and sent, it would make every site's
        weights NaN, or, kept in the error-feedback residual, every later round of this site."""
        c = self.cfg
        bad = int((~torch.isfinite(delta)).sum())
        sq = float(delta.double().pow(2).sum()) if c.dp_clip > 0 and not bad else 0.0
        site_sq, site_bad = sum_over_ranks([sq, float(bad)], self.device)
        if site_bad:
            raise CrossSiteError(f"cross-site round {k}: site {c.site}'s pseudo-gradient (synced - current "
                                 f"weights) has {int(site_bad)} NaN or inf values ({bad} on rank "
                                 f"{self.rank}): the site's training diverged since the last round; nothing "
                                 "was sent")
        if c.dp_clip > 0:
            delta = delta * clip_scale(site_sq, c.dp_clip)
        if c.dp_noise > 0:
            delta = delta + gaussian_noise(delta, c.dp_noise * c.dp_clip, noise_seed())
        return delta

    def _round(self) -> dict[str, Any]:
        c, k = self.cfg, self.round + 1
        t0 = time.monotonic()
        if self.solo:
            return self._alone(k, t0)
        try:
            start = rank0(lambda: self._start(k))
        except StoreGone as e:
            return self._store_gone(e, k, t0)
        if start["behind"]:
            return cross_site_join.catch_up(self, k, start["behind"], t0)
        if self.ledger.enabled:
            self.ledger.rounds = start["released"] - 1  # recorded before anything is posted
        released = self._release(self.synced - self.partition.read(), k)
        # error feedback keeps what rounding dropped from a payload the sites average; when they average
        # another (an earlier life's bytes) or none of this site's, that residual belongs to nothing
        kept = self.feedback.residual.clone()
        (payload, sent), _ = every_rank(lambda: self.feedback.encode(released), self)  # errors: all ranks
        try:  # the sum also tells every rank that every rank has posted
            stored, sent_here = every_rank(lambda: self.rv.post(k, payload), self,
                                           count=lambda old: 0 if old is not None else len(payload))
            decision = rank0(lambda: self._settle(k), wait=True)
        except StoreGone as e:
            self.feedback.residual = kept
            return self._store_gone(e, k, t0)
        if decision["behind"]:
            self.feedback.residual = kept
            return cross_site_join.catch_up(self, k, decision["behind"], t0)
        members, missing, ticket = decision["members"], decision["missing"], decision["ticket"]
        if stored is not None or c.site not in members:
            self.feedback.residual = kept
        self.others_done, self._first_round = decision["others_done"], False
        avg, _ = every_rank(lambda: self._average(k, members, stored, sent), self)
        mu = c.outer_momentum
        self.momentum.mul_(mu).add_(avg)
        step = avg + mu * self.momentum if mu else avg
        self.synced = self.synced - c.outer_lr * step
        self.partition.write(self.synced)
        self.round = k
        self.bytes_rank += len(payload) if stored is None else 0
        self.bytes_site += int(sent_here)
        mine = digest(self.synced)  # recorded before a joiner may read this round's state (it checks it)
        _, differ = every_rank(lambda: self.rv.record_digest(k, mine) != mine, self, count=float)
        self.diverged = bool(differ)
        if ticket and not self.diverged:  # a (re)joining site waits for it; this site is the first member
            every_rank(lambda: self.rv.publish_state(ticket, {"round": k, "synced": self.synced.cpu(),
                                                              "momentum": self.momentum.cpu()}), self)
        rank0(lambda: self._finish_round(k, ticket if ticket and not self.diverged else 0))
        if self.diverged and self.rank == 0:
            log.warning("cross-site round %d: site %s's outer state differs from the one the sites recorded; "
                        "it takes a member's state at the next round", k, c.site)
        return self._report(k, members, missing, time.monotonic() - t0)

    def _start(self, k: int) -> dict[str, Any]:
        """rank 0, before anything is posted: whether this site must take the others' state instead of
        exchanging (they are past round k, or its state differs), else record the release to come."""
        if not holds_name(self.rv, self.nonce):
            raise taken_over(self.rv, k)
        if self.diverged:
            return {"behind": "its outer state is not the one the sites recorded for that round"}
        at = self.rv.group_round()
        if at > k or (at == k and not self.rv.settled(k)):
            return {"behind": f"the sites are at round {at}"}
        released = 0
        if self.ledger.enabled:
            released = self.ledger.rounds + 1
            self.rv.set_released(released)
            self.releases.append(self.rv.generation, k)
        return {"behind": None, "released": released}

    def _settle(self, k: int) -> dict[str, Any]:
        """rank 0: round k's members, who was missed, a join ticket to serve, whether the rest is done."""
        try:
            members, missing = self.rv.agree_members(k, self._first_round)
        except Behind as e:
            return {"behind": str(e)}
        ticket = self.rv.pending_join() if members and members[0] == self.cfg.site else 0
        return {"behind": None, "members": members, "missing": missing, "ticket": ticket,
                "others_done": self.rv.others_done()}

    def _average(self, k: int, members: list[str], stored: bytes | None, sent: torch.Tensor) -> torch.Tensor:
        """The mean of the members' decoded payloads, added in the members' (sorted) order on every site:
        element-wise fp32 additions and one division, the same bits on any device. This site's own part is
        what the store holds (`stored`: an earlier life's bytes, when it had posted this round already)."""
        total: torch.Tensor | None = None
        for s in members:
            if s == self.cfg.site and stored is None:
                part = sent
            else:
                where = f"cross-site round {k}: site {s}'s payload for rank {self.rank}"
                data = stored if s == self.cfg.site else self.rv.fetch(k, s)
                part = contribution(data, sent.numel(), where, self.cfg.rendezvous).to(sent.device)
            total = part.clone() if total is None else total.add_(part)
        assert total is not None
        return total / len(members)

    def _finish_round(self, k: int, ticket: int) -> None:
        if ticket:
            self.rv.mark_served(ticket)
        self.rv.finish_round(k)

    def _store_gone(self, error: StoreGone, k: int, t0: float) -> dict[str, Any]:
        """The store stopped answering. When every other site had finished (the site that served it ended),
        this one trains on alone; otherwise that is the end of this run, with the rendezvous named."""
        if not self.others_done:
            raise error
        if self.rank == 0:
            log.warning("cross-site round %d: %s; the other sites have finished, so site %s goes on alone",
                        k, error, self.cfg.site)
        self.solo = True
        if self.heartbeat is not None:  # nobody is left to watch it: its retries would only pile up
            self.heartbeat.stop()  # connections (and, to a frozen host, threads) for the rest of the run
            self.heartbeat = None
        return self._alone(k, t0)

    def _alone(self, k: int, t0: float) -> dict[str, Any]:
        """An outer step on this site's own pseudo-gradient (nothing leaves the site)."""
        c = self.cfg
        delta = self.synced - self.partition.read()
        self.momentum.mul_(c.outer_momentum).add_(delta)
        step = delta + c.outer_momentum * self.momentum if c.outer_momentum else delta
        self.synced = self.synced - c.outer_lr * step
        self.partition.write(self.synced)
        self.round = k
        row = {"cross_site_round": k, "cross_site_sites": 1, "cross_site_bytes": self.bytes_site,
               "cross_site_s": round(time.monotonic() - t0, 3)}
        self.last = row
        return row

    def _report(self, k: int, members: list[str], missing: list[str], seconds: float) -> dict[str, Any]:
        c = self.cfg
        if missing:
            log.warning("cross-site round %d: site %s dropped for this round; remaining: %s", k,
                        ", ".join(missing), ", ".join(members))
        if c.site not in members:
            log.warning("cross-site round %d: site %s was late; it applies the average of %s without its "
                        "own update", k, c.site, ", ".join(members))
        row: dict[str, Any] = {"cross_site_round": k, "cross_site_sites": len(members),
                               "cross_site_bytes": self.bytes_site, "cross_site_s": round(seconds, 3)}
        msg = (f"cross-site round {k}: {len(members)} site(s) ({', '.join(members)}), {self.bytes_site} "
               f"bytes sent, {seconds:.2f} s")
        if self.ledger.enabled:
            eps_round, eps_total = self.ledger.record_round()
            row.update({"dp_epsilon_round": round(eps_round, 4), "dp_epsilon": round(eps_total, 4)})
            msg += f", epsilon {eps_round:.3f} this round, {eps_total:.3f} in total (delta {c.dp_delta:g})"
        log.info("%s", msg)
        self.last = row
        return row

    def finish(self) -> None:
        """At the end of training: tell the others this site is done; the site serving the store keeps it up
        until the other sites are done too (bounded by cross_site.timeout_s). A store that is gone by then
        only costs a warning: this site's training is complete (cross_site_join.leave).

        Rank 0 may spend up to about 2 x cross_site.timeout_s + 10 s there (a slow store, then the wait for
        the others), longer than parallel.timeout_s may allow one collective: the other ranks poll for it
        (`rank0(wait=True)`) instead of waiting in one barrier, which used to time out at the end of a
        finished run. Cutting rank 0's wait short instead would take the store down under sites still in
        their last round."""
        rank0(lambda: cross_site_join.leave(self), wait=True)
