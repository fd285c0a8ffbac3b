"""The outer loop of training across sites (DiLoCo): every `cross_site.every` inner steps each rank sends
the change of the ZeRO-3 partition it owns, and applies one outer Nesterov-SGD step to the average.

A site is an ordinary ZeRO-3 job. Rank r of every site owns the same slice of every parameter (same model,
same layout: checked at the rendezvous), so rank r exchanges only with rank r of the other sites, over the
TCP store of `cross_site_store`, and no rank ever holds more than its partition. Per round, on each rank:

    delta  = synced - current              the pseudo-gradient of this rank's fp32 partition
    delta *= min(1, dp_clip / ||delta||)   norm over the whole site (one all-reduce of a float)
    delta += N(0, (dp_noise * dp_clip)^2)  seeded by (site, round, rank)
    sent   = decode(encode(delta + residual))        none | fp16 | int8 | sign; int8, sign: error feedback
    avg    = mean of `sent` over the round's member sites (each site averages the same decoded bytes)
    m      = mu * m + avg;  synced -= outer_lr * (avg + mu * m)      (Nesterov; mu = 0: plain SGD)
    current = synced                       fp32 master partition and the working copy the forward reads

Every site holds the same `synced` and `m` after a round (same members, same bytes, same arithmetic), so
the outer state needs no coordinator; a site that (re)joins copies it from a member. The inner AdamW state
stays each site's own, as in DiLoCo.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
import torch.distributed as dist

from parallel import groups
from parallel.consensus import from_rank0, sum_over_ranks
from parallel.cross_site_codec import ErrorFeedback, decode
from parallel.cross_site_privacy import PrivacyLedger, clip_scale, gaussian_noise, noise_seed
from parallel.cross_site_store import CrossSiteError, Heartbeat, Rendezvous, check_fingerprint, open_store
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

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    @torch.no_grad()
    def read(self) -> torch.Tensor:
        from deepspeed.utils import safe_get_local_fp32_param

        return torch.cat([safe_get_local_fp32_param(p).reshape(-1).float() for p in self.params])

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
    rank) and what is wrong: gone from the store, truncated or corrupted, or sized for another partition."""
    if data is None:
        raise CrossSiteError(f"{where} is gone from {rendezvous} (this site is more than 3 rounds behind)")
    try:
        got = decode(data)
    except ValueError as e:
        raise CrossSiteError(f"{where}: {e}") from None
    if got.numel() != numel:
        raise CrossSiteError(f"{where} has {got.numel()} values, this rank's partition {numel}")
    return got


class OuterLoop:
    """One site's outer loop on one rank. Every rank of the site calls every method at the same step."""

    def __init__(self, cfg: CrossSiteConfig, module: torch.nn.Module, fingerprint: dict[str, Any],
                 device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.rank = groups.rank()
        self.partition = Partition(module)
        store, self.hosting = open_store(cfg.rendezvous, cfg.timeout_s, may_host=self.rank == 0)
        if self.hosting:
            log.info("cross-site: site %s serves the rendezvous store at %s", cfg.site, cfg.rendezvous)
        self.rv = Rendezvous(store, cfg.site, self.rank, cfg.rendezvous, cfg.timeout_s, cfg.sites)
        problem = None
        if self.rank == 0:
            try:
                mine = {**fingerprint, "partition_numel_rank0": self.partition.numel}
                check_fingerprint(store, cfg.site, mine, cfg.rendezvous)
            except CrossSiteError as e:
                problem = str(e)
        problem = from_rank0(problem)
        if problem:
            raise CrossSiteError(problem)
        self.synced = self.partition.read()
        self.momentum = torch.zeros_like(self.synced)
        self.feedback = ErrorFeedback(cfg.compress, self.synced.numel(), self.synced.device)
        self.ledger = PrivacyLedger(cfg.dp_noise, cfg.dp_delta)
        self.round, self.bytes_rank, self.bytes_site = 0, 0, 0
        self.heartbeat: Heartbeat | None = None
        self.last: dict[str, Any] = {}
        self._first_round = True

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """This rank's outer state for its checkpoint file (ZeRO-3: one file per rank)."""
        return {"site": self.cfg.site, "round": self.round, "synced": self.synced.cpu(),
                "momentum": self.momentum.cpu(), "residual": self.feedback.residual.cpu(),
                "dp_rounds": self.ledger.rounds, "bytes_rank": self.bytes_rank, "bytes_site": self.bytes_site}

    def load_state_dict(self, state: dict[str, Any]) -> bool:
        """Restore a checkpoint's outer state; False (and nothing changed) when it is for another layout."""
        if state["synced"].numel() != self.synced.numel():
            log.warning("cross-site: the checkpoint's outer state has %d values per rank, this layout %d; "
                        "starting the outer state from the current weights", state["synced"].numel(),
                        self.synced.numel())
            return False
        self.synced = state["synced"].to(self.synced.device)
        self.momentum = state["momentum"].to(self.synced.device)
        if state["residual"].numel() == self.feedback.residual.numel():
            self.feedback.residual = state["residual"].to(self.synced.device)
        self.round, self.ledger.rounds = int(state["round"]), int(state.get("dp_rounds", 0))
        self.bytes_rank, self.bytes_site = int(state.get("bytes_rank", 0)), int(state.get("bytes_site", 0))
        return True

    def _adopt(self, state: dict[str, Any]) -> None:
        """Take a member site's outer state (synced weights, momentum, round) and train on from it."""
        self.synced = state["synced"].to(self.synced.device)
        self.momentum = state["momentum"].to(self.synced.device)
        self.round = int(state["round"])
        self.feedback.residual.zero_()
        self.partition.write(self.synced)

    def join(self) -> None:
        """Before the first step: when the other sites are further along (this site restarts, or starts
        late), copy their outer state; then register and start the heartbeat."""
        ticket, behind = 0, 0
        if self.rank == 0:
            behind = self.rv.group_round()
            if behind > self.round and self.rv.others_alive():
                asked = self.rv.ask_state()
                log.info("cross-site: site %s is at round %d, the running sites at %d; asking them for the "
                         "outer state", self.cfg.site, self.round, behind)
                ticket = self.rv.wait_state(asked)
                if not ticket:
                    log.warning("cross-site: no running site answered within %d s; site %s goes on from its "
                                "own outer state (round %d)", self.cfg.timeout_s, self.cfg.site, self.round)
        ticket = from_rank0(ticket)
        if ticket:
            self._adopt(self.rv.read_state(ticket))
            if self.rank == 0:
                log.info("cross-site: site %s rejoined at round %d", self.cfg.site, self.round)
        if self.rank == 0:
            self.rv.register()
            self.heartbeat = Heartbeat(self.cfg.rendezvous, self.cfg.site, self.cfg.timeout_s)
        groups.barrier()

    # ------------------------------------------------------------------ rounds
    def after_step(self, step: int) -> dict[str, Any] | None:
        """Call after every optimizer step; runs a round every `cross_site.every` steps and returns its
        metrics (None between rounds)."""
        if step % self.cfg.every:
            return None
        return self._round()

    def _release(self, delta: torch.Tensor, k: int) -> torch.Tensor:
        """What may leave the site: clipped over the whole site's model, then noised (dp_* settings)."""
        c = self.cfg
        if c.dp_clip > 0:
            site_sq = sum_over_ranks([float(delta.double().pow(2).sum())], self.device)[0]
            delta = delta * clip_scale(site_sq, c.dp_clip)
        if c.dp_noise > 0:
            delta = delta + gaussian_noise(delta, c.dp_noise * c.dp_clip, noise_seed(c.site, k, self.rank))
        return delta

    def _round(self) -> dict[str, Any]:
        c, k = self.cfg, self.round + 1
        t0 = time.monotonic()
        payload, sent = self.feedback.encode(self._release(self.synced - self.partition.read(), k))
        self.rv.post(k, payload)
        sent_here = int(sum_over_ranks([float(len(payload))], self.device)[0])  # also: every rank has posted
        decision = None
        if self.rank == 0:
            members, missing = self.rv.agree_members(k, self._first_round)
            ticket = self.rv.pending_join() if members and members[0] == c.site else 0
            decision = (members, missing, ticket)
        members, missing, ticket = from_rank0(decision)
        self._first_round = False
        others = [s for s in members if s != c.site]
        contributions = [sent] if c.site in members else []
        for s in others:
            where = f"cross-site round {k}: site {s}'s payload for rank {self.rank}"
            contributions.append(contribution(self.rv.fetch(k, s), sent.numel(), where, c.rendezvous)
                                 .to(sent.device))
        avg = torch.stack(contributions).mean(dim=0)
        mu = c.outer_momentum
        self.momentum.mul_(mu).add_(avg)
        step = avg + mu * self.momentum if mu else avg
        self.synced = self.synced - c.outer_lr * step
        self.partition.write(self.synced)
        self.round = k
        self.bytes_rank += len(payload)
        self.bytes_site += sent_here
        if ticket:  # a (re)joining site waits for this round's outer state; this site is the first member
            self.rv.publish_state(ticket, {"round": k, "synced": self.synced.cpu(),
                                           "momentum": self.momentum.cpu()})
            groups.barrier()
            if self.rank == 0:
                self.rv.mark_served(ticket)
        if self.rank == 0:
            self.rv.finish_round(k)
        return self._report(k, members, missing, time.monotonic() - t0)

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
        until the other sites are done too (bounded by cross_site.timeout_s)."""
        if self.rank == 0:
            self.rv.mark_done()
            if self.heartbeat is not None:
                self.heartbeat.stop()
            if self.hosting:
                self.rv.wait_others_done()
        groups.barrier()
