"""DistributedDataParallel over rnn_triton modules: two CPU processes (gloo), each training on its half
of a batch, reach the gradients and parameters of one process training on the whole batch.

Each rank is a subprocess running this file as a script, with TRITON_INTERPRET=1 and
RNN_TRITON_STRICT=1 in its environment from the start (so they precede any import of triton). The
loss is a mean and the shards are equal, so DDP's averaged gradient is the full-batch gradient.
"""
import gc
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta

import torch
from torch import nn

#: Whole batch (split in two), steps, sizes. Tiny: the interpreter is slow.
B, T, I, H, STEPS, WORLD = 4, 5, 3, 8, 2, 2
#: Seconds before a collective gives up (the worker then fails with gloo's message), and before the
#: test kills a worker that is still running.
COLLECTIVE_TIMEOUT, TIMEOUT = 60, 90


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        import rnn_triton
        self.lstm = rnn_triton.LSTM(I, H, batch_first=True)
        self.head = nn.Linear(H, 1)

    def forward(self, x):
        y, _ = self.lstm(x)
        return self.head(y[:, -1])


def _train(model, x, target):
    """STEPS of SGD with momentum on (x, target); the gradients of the last step, by name."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for _ in range(STEPS):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), target).backward()
        opt.step()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _initial(path):
    torch.manual_seed(0)
    torch.save({"state": Model().double().state_dict(), "x": torch.randn(B, T, I, dtype=torch.float64),
                "target": torch.randn(B, 1, dtype=torch.float64)}, path)


def _worker(rank, port, directory):
    """One DDP rank: train on its shard, save parameters, last gradients and launch counts."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from rnn_triton import runtime
    assert runtime.interpreting() and runtime.strict()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT))
    ddp = None
    try:
        data = torch.load(os.path.join(directory, "initial.pt"))
        model = Model().double()
        model.load_state_dict(data["state"])
        shard = slice(rank * B // WORLD, (rank + 1) * B // WORLD)
        ddp = DistributedDataParallel(model)
        grads = {n.removeprefix("module."): g for n, g in
                 _train(ddp, data["x"][shard], data["target"][shard]).items()}
        torch.save({"params": {n: p.detach() for n, p in model.named_parameters()}, "grads": grads,
                    "launches": dict(runtime.launches)}, os.path.join(directory, f"rank{rank}.pt"))
    finally:
        # The DDP module must not take the process group down with it. Freed last, its C++ Reducer
        # runs ~ProcessGroupGloo under the GIL, which joins a gloo thread waiting for the GIL to free
        # a Python object: a deadlock when _worker returns (3 of the first 4 runs here, torch 2.13).
        # Freed first, it leaves the group to destroy_process_group, which frees it without the GIL.
        ddp = None
        gc.collect()
        dist.destroy_process_group()


def _launched(direction: str, counts) -> int:
    """Kernel launches of any variant in ``direction`` ("fwd" or "bwd") in a launch Counter's copy."""
    return sum(n for name, n in counts.items() if name.endswith("_" + direction))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_ranks_match_one_process_on_the_whole_batch(tmp_path):
    from rnn_triton import runtime

    _initial(tmp_path / "initial.pt")
    env = dict(os.environ, TRITON_INTERPRET="1", RNN_TRITON_STRICT="1", OMP_NUM_THREADS="1")
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the loopback, whatever the host name resolves to
    port = _free_port()
    logs = [open(tmp_path / f"rank{r}.log", "w+") for r in range(WORLD)]
    procs = [subprocess.Popen([sys.executable, __file__, str(r), str(port), str(tmp_path)], env=env,
                              stdout=logs[r], stderr=subprocess.STDOUT) for r in range(WORLD)]
    deadline = time.monotonic() + TIMEOUT
    try:
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    codes = [p.returncode for p in procs]
    output = []
    for log in logs:
        log.seek(0)
        output.append(log.read()[-3000:])
        log.close()
    assert codes == [0] * WORLD, "\n".join(f"rank {r} exited {c} (-9: killed after {TIMEOUT} s):\n{o}"
                                           for r, (c, o) in enumerate(zip(codes, output)))

    # The same training in this process, no DDP, on the whole batch.
    data = torch.load(tmp_path / "initial.pt")
    model = Model().double()
    model.load_state_dict(data["state"])
    before = _launched("bwd", runtime.launches)
    grads = _train(model, data["x"], data["target"])
    assert _launched("bwd", runtime.launches) > before

    for r in range(WORLD):
        result = torch.load(tmp_path / f"rank{r}.pt")
        assert _launched("fwd", result["launches"]) >= STEPS, f"rank {r}: forward kernel did not run"
        assert _launched("bwd", result["launches"]) >= STEPS, f"rank {r}: backward kernel did not run"
        for name, p in model.named_parameters():
            for kind, ours, ref in (("grad", result["grads"][name], grads[name]),
                                    ("param", result["params"][name], p.detach())):
                err = ((ours - ref).norm() / ref.norm()).item()
                assert err < 1e-10, f"rank {r}: {kind} of {name} off by {err:.2e}"


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
