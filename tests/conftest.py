"""Fixtures shared by tests/unit (fast, single process) and tests/e2e (multi-process, launchers, Slurm/MPI).

This folder is on sys.path (pytest puts a rootless conftest's folder there), so test modules import the
helper modules beside it: `tiny` (tiny models, shards, running `pretrain` as users do), `datautil`
(data-pipeline helpers) and `localcluster` (Slurm/MPI/namespaces on one machine).
"""

from __future__ import annotations

import os
from pathlib import Path

# torch's TCPStore server formats a peer's address with getnameinfo, a reverse DNS lookup, on its event-loop
# thread; peers of the tests' in-process stores are ::ffff:127.0.0.1, which /etc/hosts does not name, so
# each lookup goes to the resolver, and on a machine without a reachable one (this sandbox, CI) it waits 5 s
# per try. The store then answers nobody for 5-10 s and a client's 3 s connect fails (seen as an
# order-dependent failure of the cross-site unit tests: gdb showed the store thread in res_send's poll).
# One 1 s try keeps the stall below the tests' timeouts; set before any lookup, inherited by subprocesses.
os.environ.setdefault("RES_OPTIONS", "timeout:1 attempts:1")

import pytest  # noqa: E402
import torch  # noqa: E402
from datautil import tiny_tokenizer  # noqa: E402
from tiny import run_pretrain, write_shards

from data_pipelines.tokenizer import TextTokenizer

GROUPS = {
    # modules that read the same session-scoped run (`trained_once`, `layout_straight`): one worker trains it
    "straight_2ranks": ("test_train_e2e", "test_reliability", "test_no_unpickling"),
    "plain_zero3_4ranks": ("test_zeropp", "test_plan_comm"),
    "layout_straight": ("test_resume_any_layout", "test_universal_resume", "test_fusion_train"),
    # modules that start a private Slurm cluster, Open MPI jobs or network namespaces: one at a time
    "cluster": ("test_launch_slurm", "test_launch_mpi", "test_launch_netns", "test_cross_site"),
}
"""Under `pytest -n 2` (`make test`, pytest-xdist) each group runs on one worker, and every other module is a
unit of its own, so module- and session-scoped fixtures are built once (`pytest_xdist_make_scheduler`)."""
_GROUP_OF = {module: group for group, modules in GROUPS.items() for module in modules}


def pytest_configure(config: pytest.Config) -> None:
    """Under `pytest -n N` each worker (and every process it starts) gets cores / N intra-op threads (two
    workers each spinning two OpenMP threads on two cores slowed small training loops many times over) and
    its own slice of the store-port window (`MMPT_PORT_RANGE`), so two workers never pick the same port."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        from launch.ports import port_range

        lo, hi = port_range()
        index = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
        width = (hi - lo) // workers
        if width >= 16:  # a kernel whose ephemeral range starts low leaves no window: its own choice then
            os.environ["MMPT_PORT_RANGE"] = f"{lo + index * width}-{lo + (index + 1) * width}"


@pytest.hookimpl(optionalhook=True)  # pytest without xdist (its hook spec) still loads this file
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """xdist's module scheduling (`--dist loadscope`) with the modules of a GROUPS entry as one unit. (Not
    `--dist loadgroup` with marks: xdist 3.8 tags node ids through `item._nodeid`, which pytest 9 ignores.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ModuleGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return _GROUP_OF.get(Path(path).stem, path)

    return ModuleGroups(config, log)


@pytest.fixture
def one_thread():
    """Tiny matrices gain nothing from intra-op threads, and on a busy 2-core box spinning OpenMP workers
    made small training loops 10-30x slower. Use with `pytestmark = pytest.mark.usefixtures(...)`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_tok() -> TextTokenizer:
    """A 200-token BPE tokenizer trained on synthetic captions (one per test module)."""
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> dict[str, str]:
    """`tiny.write_shards`: 640 training and 128 held-out 32-px samples, written once per session (read
    only; one path for every module, so runs shared through `trained_once` have the same arguments)."""
    return write_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="session")
def trained_once(tmp_path_factory):
    """`trained_once(args, procs=1, env=None) -> run folder`: `pretrain train run.dir=FOLDER *args` on
    `procs` ranks (tiny.run_pretrain), run the first time a test asks for exactly these arguments, rank count
    and environment, and shared by every later test (any module) that asks for the same: a reference run
    several tests read but never change. `{dir}` in an env value is the run folder's parent (a place for
    side files, e.g. MMPT_COMMS_LOG={dir}/comms). A failed run fails every test that asks for it."""
    runs: dict[tuple, tuple[Path, str | None]] = {}

    def train(args: list[str], procs: int = 1, env: dict[str, str] | None = None) -> Path:
        key = (tuple(args), procs, tuple(sorted((env or {}).items())))
        if key not in runs:
            d = tmp_path_factory.mktemp("shared_run")
            run = d / "run"
            r = run_pretrain(["train", f"run.dir={run}", *args], procs=procs, timeout=600,
                             env={k: v.replace("{dir}", str(d)) for k, v in (env or {}).items()})
            runs[key] = run, None if r.returncode == 0 else r.stdout[-3000:] + r.stderr[-3000:]
        run, failed = runs[key]
        assert failed is None, failed
        return run

    return train


@pytest.fixture(scope="session")
def layout_data(tmp_path_factory) -> list[str]:
    """`layouts.write_layout_data` for the reference run's STEPS global batches (the data.* overrides)."""
    from layouts import STEPS, write_layout_data

    return write_layout_data(tmp_path_factory.mktemp("layout_data"), STEPS)


@pytest.fixture(scope="session")
def layout_straight(layout_data, tmp_path_factory) -> Path:
    """The reference run of tests/layouts.py, trained once for the resume and conversion tests: STEPS steps at
    (dp=2, tp=1), checkpoints every EVERY steps in both formats (checkpoint.universal)."""
    from layouts import EVERY, train

    run = tmp_path_factory.mktemp("layout_runs") / "dp2"
    train(run, layout_data, 2, extra=[f"checkpoint.every={EVERY}", "checkpoint.universal=true"])
    return run
