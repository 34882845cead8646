"""torchrun --nproc-per-node 2 tests/kernels/ce_tp_check.py BACKEND: the vocab-parallel loss on
2 gloo ranks against the whole-vocabulary result computed on each rank (used by
test_cross_entropy.py)."""

import sys

import torch
import torch.distributed as dist

from megatron_hybrid.kernels.cross_entropy import cross_entropy_with_z_loss

backend = sys.argv[1]
dist.init_process_group("gloo")
rank = dist.get_rank()
g = torch.Generator().manual_seed(7)
n, vocab = 12, 96
full = torch.randn(n, vocab, generator=g) * 3
full[0, : vocab // 2] = float("-inf")  # rank 0's slice of row 0 is all -inf
full[1, vocab // 2 :] = float("-inf")  # rank 1's slice of row 1 is all -inf
target = torch.randint(0, vocab, (n,), generator=g)
target[0], target[1] = vocab - 1, 0
coeff = 1e-2


def run(x, group):
    x = x.clone().requires_grad_(True)
    ce, z = cross_entropy_with_z_loss(x, target, group, backend=backend)
    w = torch.arange(1, n + 1, dtype=torch.float32)
    ((ce + coeff * z) * w).sum().backward()
    return ce, z, x.grad


ce1, z1, g1 = run(full, None)
half = vocab // 2
ce2, z2, g2 = run(full[:, rank * half : (rank + 1) * half], dist.group.WORLD)
torch.testing.assert_close(ce2, ce1, rtol=1e-6, atol=1e-6)
torch.testing.assert_close(z2, z1, rtol=1e-6, atol=1e-6)
torch.testing.assert_close(g2, g1[:, rank * half : (rank + 1) * half], rtol=1e-6, atol=1e-7)
assert torch.isfinite(g2).all()
print(f"TP-CE OK rank {rank}", flush=True)
dist.destroy_process_group()
