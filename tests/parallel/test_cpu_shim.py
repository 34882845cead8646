"""The CPU shim for megatron-core: every entry point it patches still exists and works.

Runs in a subprocess (the shim patches torch.cuda process-wide). If a megatron-core upgrade moves
or renames something the shim relies on, this test names it.
"""

from __future__ import annotations

import textwrap

from tests.conftest import run_python

SCRIPT = textwrap.dedent(
    """
    import torch
    import megatron.core
    from megatron.core.tensor_parallel import random as mp_random
    # Names the shim replaces must exist upstream (else it silently patches nothing).
    for name in ("_get_cuda_rng_state", "_set_cuda_rng_state"):
        assert hasattr(mp_random, name), f"megatron-core moved tensor_parallel.random.{name}"
    from megatron_hybrid.parallel.cpu_shim import install_cpu_shim
    assert install_cpu_shim() is True and install_cpu_shim() is True   # idempotent
    assert torch.cuda.current_device() == torch.device("cpu")
    torch.cuda.synchronize(); torch.cuda.empty_cache()
    s = torch.cuda.current_stream(); s.wait_stream(torch.cuda.Stream()); s.wait_event(torch.cuda.Event())
    assert torch.empty(3, device="cuda").device.type == "cpu"
    assert torch.zeros(2, device=torch.device("cuda", 0)).device.type == "cpu"
    assert torch.ones(2).to("cuda").device.type == "cpu"
    t = torch.ones(2); assert t.cuda() is t
    assert torch.tensor([1, 2], device="cpu", pin_memory=True).tolist() == [1, 2]
    assert torch.nn.Parameter(torch.ones(2)).type() == "torch.cuda.FloatTensor"
    assert t.type(torch.float64).dtype == torch.float64
    # megatron's TP RNG tracker forks the (now CPU) generator and restores it afterwards.
    from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed
    from megatron_hybrid.parallel import state
    state.initialize(state.ParallelLayout())
    model_parallel_cuda_manual_seed(7)
    torch.manual_seed(0); before = torch.rand(1)
    torch.manual_seed(0)
    with get_cuda_rng_tracker().fork():
        inside = torch.rand(1)
    after = torch.rand(1)
    assert torch.equal(after, before), "tracker fork did not restore the default generator"
    assert not torch.equal(inside, before)
    # A real megatron-core module runs: parallel linear forward + backward.
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron_hybrid.models.olmo_hybrid.presets import tiny
    tcfg = tiny().transformer_config()
    lin = ColumnParallelLinear(8, 4, config=tcfg, init_method=torch.nn.init.ones_, bias=False)
    with torch.no_grad():  # our configs leave init to models/olmo_hybrid/init.py
        lin.weight.fill_(1.0)
    out, _ = lin(torch.ones(3, 1, 8)); out.sum().backward()
    assert lin.weight.grad is not None and float(out[0, 0, 0]) == 8.0
    state.destroy()
    print("SHIM OK", megatron.core.__version__)
    """
)


def test_cpu_shim_entry_points():
    proc = run_python(["-c", SCRIPT])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SHIM OK 0.19.2" in proc.stdout


def test_built_model_matches_param_formula():
    code = textwrap.dedent(
        """
        from megatron_hybrid.parallel import state
        from megatron_hybrid.models.olmo_hybrid.presets import tiny
        from megatron_hybrid.models.olmo_hybrid.model import build_model
        state.initialize()
        cfg = tiny()
        m = build_model(cfg)
        n = sum(p.numel() for p in m.parameters())
        assert n == cfg.num_params(), (n, cfg.num_params())
        print("COUNT OK", n)
        """
    )
    proc = run_python(["-c", code])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "COUNT OK" in proc.stdout


def test_destroy_takes_back_the_rendezvous_defaults_it_set():
    """A 1-rank in-process run (tests, the expressivity grid's in-process cells) leaves no
    MASTER_PORT behind: children started afterwards with this environment rendezvous on their
    own port, and a second initialize in the same process works."""
    code = textwrap.dedent(
        """
        import os, subprocess, sys
        from megatron_hybrid.parallel import state
        state.initialize()
        assert "MASTER_PORT" in os.environ
        state.destroy()
        assert not {"MASTER_PORT", "RANK", "WORLD_SIZE"} & set(os.environ), os.environ
        child = subprocess.run([sys.executable, "-c",
            "from megatron_hybrid.parallel import state; state.initialize(); state.destroy(); print('CHILD OK')"],
            env=dict(os.environ), capture_output=True, text=True)
        assert child.returncode == 0 and "CHILD OK" in child.stdout, child.stderr[-2000:]
        state.initialize(); state.destroy()
        os.environ["MASTER_PORT"] = "12399"  # a launcher's value is the launcher's: kept
        state.initialize(); state.destroy()
        assert os.environ["MASTER_PORT"] == "12399"
        print("ENV OK")
        """
    )
    proc = run_python(["-c", code])
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "ENV OK" in proc.stdout
