"""The `mpu` object DeepSpeed takes from Megatron-style clients, backed by megatron-core's groups.

DeepSpeed asks an `mpu` for the data-parallel group (ZeRO partitions, gradient reduction and the
start-up parameter broadcast run over it) and for the model-parallel group (grad-norm and overflow
reductions: parameters marked `tensor_model_parallel` count on every TP rank, replicated ones only on
TP rank 0, so nothing is double counted). megatron-core's `parallel_state` has the tensor/data names
but not the older `get_model_parallel_*` ones; without pipeline parallelism, model parallel = tensor
parallel. Only the methods DeepSpeed 0.16-0.19 calls are provided (see `deepspeed/utils/groups.py`,
`runtime/zero/stage3.py`, `runtime/utils.py`); sequence-parallel names are deliberately absent, since
DeepSpeed switches to a different code path when it finds them.
"""

from __future__ import annotations

import torch.distributed as dist


class MegatronMPU:
    """Stateless adapter: every call reads megatron-core's `parallel_state` (initialise it first)."""

    @staticmethod
    def _ps():
        from megatron.core import parallel_state as ps

        if not ps.model_parallel_is_initialized():
            raise RuntimeError("megatron-core parallel_state is not initialised; call "
                               "parallel.groups.init_distributed first")
        return ps

    # --- tensor (= model) parallel
    def get_tensor_model_parallel_group(self):
        return self._ps().get_tensor_model_parallel_group()

    def get_tensor_model_parallel_rank(self) -> int:
        return self._ps().get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self) -> int:
        return self._ps().get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self._ps().get_tensor_model_parallel_src_rank()

    get_model_parallel_group = get_tensor_model_parallel_group
    get_model_parallel_rank = get_tensor_model_parallel_rank
    get_model_parallel_world_size = get_tensor_model_parallel_world_size
    get_slice_parallel_group = get_tensor_model_parallel_group
    get_slice_parallel_rank = get_tensor_model_parallel_rank
    get_slice_parallel_world_size = get_tensor_model_parallel_world_size

    # --- data parallel
    def get_data_parallel_group(self):
        return self._ps().get_data_parallel_group()

    def get_data_parallel_rank(self) -> int:
        return self._ps().get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return self._ps().get_data_parallel_world_size()

    def get_data_parallel_group_ranks(self) -> list[int]:
        group = self.get_data_parallel_group()
        return [dist.get_global_rank(group, r) for r in range(dist.get_world_size(group))]

    # --- pipeline parallel: none
    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    def get_pipeline_model_parallel_group(self):
        return self._ps().get_pipeline_model_parallel_group()

    get_pipe_parallel_world_size = get_pipeline_model_parallel_world_size
    get_pipe_parallel_rank = get_pipeline_model_parallel_rank
    get_pipe_parallel_group = get_pipeline_model_parallel_group
