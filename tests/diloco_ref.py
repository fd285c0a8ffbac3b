"""One replica of a two-replica DiLoCo run, as this system's outer loop or as torchft's, on the tests' small
model and batches (tests/batches.py); run as a script by tests/e2e/test_cross_site_torchft.py:

    python tests/diloco_ref.py ours SPEC.json SITE_INDEX      # DeepSpeed ZeRO-3 (1 rank), parallel.cross_site
    python tests/diloco_ref.py torchft SPEC.json SITE_INDEX   # plain torch; torchft.local_sgd.DiLoCo

Both sides build the same model from `train.seed`, train it with the same AdamW (our `param_groups`, our
LR schedule, torch's fused kernel: `optim.impl=torch_fused`) on the same batches (replica i draws from seed
1000 + i), and exchange every `cross_site.every` steps with the same outer step (`cross_site.outer_lr`,
`cross_site.outer_momentum`: torch SGD with Nesterov on torchft's side). What differs is everything the
comparison is about: ZeRO-3's partitions read and written by `OuterLoop` over our TCP store, against
torchft's Manager, lighthouse quorum and gloo all-reduce on whole `p.data`.

SPEC holds `steps`, `lighthouse` and `runs`, a list of {`overrides`, `out`}: the runs go one after another in
this one process, each from a fresh model, optimizers and engine and store (ours) or Manager (torchft's), and
each writes its final fp32 parameters {name: tensor} to its `out` path. One process for all the runs because
the imports (torch's compiler stack, DeepSpeed, torchft) cost more CPU than a run's training does.
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
from batches import ENGINE_BASE, EOS, PAD, VOCAB, make_batch


def _config(spec: dict, site: int):
    from pretrain.config import load_config

    return load_config(None, [*ENGINE_BASE, "train.grad_clip=0", "optim.impl=torch_fused",
                              f"train.steps={spec['steps']}", *spec["overrides"], f"cross_site.site=s{site}"])


def _batches(cfg, site: int) -> list[dict[str, torch.Tensor]]:
    m = cfg.model
    gen = torch.Generator().manual_seed(1000 + site)
    patches = (m.image_size // m.vision.patch_size) ** 2
    return [make_batch(gen, cfg.train.micro_batch, m.image_size, patches, m.text.context_length)
            for _ in range(cfg.train.steps)]


def _model(cfg):
    from pretrain.models import PretrainModel

    torch.manual_seed(cfg.train.seed)
    return PretrainModel(cfg.model, cfg.objectives, vocab_size=VOCAB, pad_id=PAD, eos_id=EOS)


def ours(spec: dict, site: int) -> dict[str, torch.Tensor]:
    import deepspeed

    from parallel import groups
    from parallel.cross_site import OuterLoop
    from parallel.engine import build_engine
    from pretrain.config import engine_spec
    from pretrain.parallelize import parallelize

    cfg = _config(spec, site)
    groups.init_distributed(120, 1)
    engine, _ = build_engine(engine_spec(cfg), parallelize(_model(cfg), cfg), 1)
    loop = OuterLoop(cfg.cross_site, engine.module, {"model": "tests' small engine model"}, engine.device)
    loop.join()
    engine.train()
    for step, batch in enumerate(_batches(cfg, site), start=1):
        out = engine(batch)
        engine.backward(out["loss"])
        engine.step()
        loop.after_step(step)
    loop.finish()
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}


def reference(spec: dict, site: int) -> dict[str, torch.Tensor]:
    from torchft.local_sgd import DiLoCo
    from torchft.manager import Manager
    from torchft.process_group import ProcessGroupGloo

    from parallel.engine import lr_lambda, param_groups
    from parallel.optimizers import client_optimizer
    from pretrain.config import engine_spec

    cfg = _config(spec, site)
    model = _model(cfg)
    o, c = cfg.optim, cfg.cross_site
    inner = client_optimizer(o.impl, o)(param_groups(model, o.weight_decay, o.lr))  # what DeepSpeed is given
    schedule = torch.optim.lr_scheduler.LambdaLR(inner, lr_lambda(engine_spec(cfg)))
    outer = torch.optim.SGD(model.parameters(), lr=c.outer_lr, momentum=c.outer_momentum,
                            nesterov=c.outer_momentum > 0)
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    wait = timedelta(seconds=60)
    manager = Manager(pg=ProcessGroupGloo(timeout=wait), load_state_dict=None, state_dict=None,
                      min_replica_size=2, use_async_quorum=False, replica_id=f"s{site}", rank=0, world_size=1,
                      store_addr="127.0.0.1", store_port=store.port, lighthouse_addr=spec["lighthouse"],
                      hostname="127.0.0.1", port=0, init_sync=False, timeout=wait, quorum_timeout=wait,
                      connect_timeout=wait)
    try:
        model.train()
        with DiLoCo(manager, [model], inner, outer, sync_every=c.every, pin_memory=False):
            for batch in _batches(cfg, site):
                loss = model(batch)["loss"]
                inner.zero_grad()
                loss.backward()
                inner.step()  # DiLoCo's post-step hook runs the round every `sync_every` steps
                schedule.step()
        return {n: p.detach().float().clone() for n, p in model.named_parameters()}
    finally:
        manager.shutdown()


if __name__ == "__main__":
    side, spec_path, index = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    job = json.loads(spec_path.read_text())
    for run in job["runs"]:
        spec = {**job, **run}
        params = (ours if side == "ours" else reference)(spec, index)
        torch.save(params, spec["out"].format(side=side, site=index))
