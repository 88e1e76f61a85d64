"""Time the project's training step against the same work in PyTorch (when torch is installed).

    python benchmarks/train_step.py                      # CIFAR and ImageNet settings, 3 rounds
    python benchmarks/train_step.py --settings cifar cifar_synth --rounds 5

Settings (task 1 of the protocol: old model frozen, PODNet loss, SGD):
  cifar          CIFAR100 B50: ResNet-32 + LSC (60 classes x 10 proxies), batch 128, 32x32, the
                 uint8 pool on the device, gather + augmentation inside the step
  cifar_synth    the same with a synthetic batch of 128 (both losses): 256 images per step
  imagenet       ImageNet-Subset: ResNet-18 (PODNet stem) + LSC (60 x 10), batch 64, 224x224,
                 batches arriving decoded (the host pipeline's output)
  imagenet_synth the same with a synthetic batch of 64

The JAX step is the one the task loop builds (``train.make_train_step`` over a
``data.stream.DeviceStream`` / ``DecodedBatches``, jitted with the state donated): the head
allocated for the protocol's 100 classes (40 dead, masked), the task's facts and the learning rate
as traced arguments. The PyTorch step
is written here from the project's description of the official network and losses (docs/method.md,
docs/fidelity.md: rebuffi ResNet-32 / PODNet ResNet-18, LSC with softmax merging, NCA with margin
0.6, POD-flat, POD-spatial, clamp 5, SGD momentum 0.9 with coupled weight decay); it is not the
official code. Both run on the same CPU, in the same process, alternating rounds; a round times
``--steps`` steps after ``--warmup`` steps (JAX: blocked on the result at the end of the round).
Printed per setting: images/s (median over rounds), XLA's FLOP count of one step and the achieved
FLOP/s, and the ratio project / PyTorch.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time

import numpy as np

SETTINGS = {
    "cifar": dict(model="resnet32", size=32, batch=128, synth=0),
    "cifar_synth": dict(model="resnet32", size=32, batch=128, synth=128),
    "imagenet": dict(model="resnet18", size=224, batch=64, synth=0),
    "imagenet_synth": dict(model="resnet18", size=224, batch=64, synth=64),
}
OLD, NEW, K, TOTAL = 50, 10, 10, 100


# ------------------------------------------------------------------------------------------ JAX
def jax_step(setting: dict, seed: int = 0, dtype: str = "float32"):
    """(run(n) -> seconds for n steps, images per step, FLOPs per step) for the project's step."""
    import jax
    import jax.numpy as jnp

    from sdcil_jax import parallel
    from sdcil_jax import train as train_lib
    from sdcil_jax.config import base_config
    from sdcil_jax.data.pool import TaskPool
    from sdcil_jax.data.sources import ArraySource
    from sdcil_jax.data.stream import DecodedBatches, DeviceStream
    from sdcil_jax.methods import TaskInfo, get_method
    from sdcil_jax.models import build_backbone

    cfg = base_config()
    cfg.model.name = setting["model"]
    cfg.model.dtype = dtype
    cfg.method.name = "podnet"
    cfg.method.pod_flat, cfg.method.pod_spatial = (1.0, 3.0) if setting["size"] == 32 else (10., 8.)
    backbone = build_backbone(cfg.model)
    info = TaskInfo(task=1, num_old=OLD, num_new=NEW)
    method = get_method(cfg)
    size, batch, synth = setting["size"], setting["batch"], setting["synth"]
    variables = jax.jit(lambda k: backbone.init(k, jnp.zeros((1, size, size, 3)), train=False))(
        jax.random.PRNGKey(seed))
    feat_dim = 64 if setting["model"] == "resnet32" else 512
    head = method.pad_head(jax.device_get(method.init_head(jax.random.PRNGKey(1), feat_dim,
                                                           OLD + NEW)), TOTAL)
    params = {"backbone": variables["params"], "head": head}
    old = {"params": params, "batch_stats": variables["batch_stats"]}
    mesh = parallel.make_mesh()
    tx = train_lib.sgd_direction(0.9, 5e-4)
    rng = np.random.default_rng(seed)
    mean, std = np.full(3, 0.5, np.float32), np.full(3, 0.25, np.float32)
    if size == 32:
        n = 4096
        images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, OLD + NEW, size=n).astype(np.int32)
        pool = TaskPool(labels, n // 2, n, ArraySource(images, labels), images)
        stream = DeviceStream(pool, np.arange(n // 2), batch_size=batch, synth_batch=synth,
                              use_in="both", seed=0, task=1, mesh=mesh,
                              augment=dict(crop_padding=4, flip=True, brightness=63 / 255))
        batches = [b for _, _, b in stream.batches(0, 0, 1)]
    else:
        stream = DecodedBatches(batch_size=batch, synth_batch=synth, use_in="both", mesh=mesh)
        sharding = parallel.batch_sharded(mesh)
        batches = []
        for _ in range(2):
            b = {"real_image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
                 "real_label": rng.integers(0, OLD + NEW, batch).astype(np.int32)}
            if synth:
                b["synth_image"] = rng.integers(0, 256, (synth, size, size, 3), dtype=np.uint8)
                b["synth_label"] = rng.integers(0, OLD, synth).astype(np.int32)
            batches.append({k: parallel.put_global(v, sharding) for k, v in b.items()})
    step = jax.jit(train_lib.make_train_step(backbone, method, tx, stream, mean, std,
                                             lr_kind="cosine_epoch"), donate_argnums=(0,))
    args = parallel.put_replicated(train_lib.step_args(
        method, stream, train_lib.schedule_args(0.1, 160 * 40, 40), info), mesh)
    state = parallel.put_replicated(train_lib.init_state(params, variables["batch_stats"], tx), mesh)
    old = parallel.put_replicated(old, mesh)
    key = jax.random.PRNGKey(3)
    compiled = step.lower(state, old, stream.pool, batches[0], key, args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
    holder = {"state": state}
    parts = dict(backbone=backbone, method=method, stream=stream, batches=batches, state=state,
                 old=old, mean=mean, std=std, key=key, args=args)

    def run(steps: int) -> float:
        start = time.perf_counter()
        for i in range(steps):
            holder["state"], metrics = step(holder["state"], old, stream.pool,
                                            batches[i % len(batches)], key, args)
        jax.block_until_ready(metrics["loss"])
        return time.perf_counter() - start

    run.parts = parts
    return run, batch + synth, flops


# -------------------------------------------------------------------------------------- PyTorch
def torch_step(setting: dict, seed: int = 0, device: str = "cpu"):
    """(run(n) -> seconds, images per step) for the same work written in PyTorch on ``device``."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    torch.manual_seed(seed)

    class Block(nn.Module):
        def __init__(self, cin, cout, stride, shortcut, relu_out):
            super().__init__()
            self.conv_a = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn_a = nn.BatchNorm2d(cout)
            self.conv_b = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn_b = nn.BatchNorm2d(cout)
            self.shortcut, self.relu_out, self.cout = shortcut, relu_out, cout
            if shortcut == "projection":
                self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

        def forward(self, x):
            y = self.bn_b(self.conv_b(F.relu(self.bn_a(self.conv_a(x)))))
            if self.shortcut == "pad":  # rebuffi: every second pixel, zero channels appended
                x = x[:, :, ::2, ::2]
                x = torch.cat([x, torch.zeros_like(x)], 1)
            elif self.shortcut == "projection":
                x = self.proj(x)
            y = x + y
            return F.relu(y) if self.relu_out else y

    class Net(nn.Module):
        def __init__(self, kind):
            super().__init__()
            if kind == "resnet32":
                self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16),
                                          nn.ReLU())
                spec = [[(16, 16, 1, None)] * 5,
                        [(16, 32, 2, "pad")] + [(32, 32, 1, None)] * 4,
                        [(32, 64, 2, "pad")] + [(64, 64, 1, None)] * 3,
                        [(64, 64, 1, None)]]
                relu = lambda i, n: False  # noqa: E731
                self.dim = 64
            else:
                self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64),
                                          nn.ReLU(), nn.MaxPool2d(3, 2, 1))
                spec, cin = [], 64
                for st in range(4):
                    cout, stride = 64 * 2**st, 1 if st == 0 else 2
                    short = "projection" if stride != 1 or cin != cout else None
                    spec.append([(cin, cout, stride, short), (cout, cout, 1, None)])
                    cin = cout
                relu = lambda i, n: i == 0  # noqa: E731
                self.dim = 512
            self.stages = nn.ModuleList(
                nn.ModuleList(Block(*b, relu_out=relu(i, len(st))) for i, b in enumerate(st))
                for st in spec)
            self.proxies = nn.Parameter(torch.randn((OLD + NEW) * K, self.dim) / self.dim**0.5)
            self.scale = nn.Parameter(torch.tensor(1.0))

        def forward(self, x):
            x = self.stem(x)
            maps = []
            for stage in self.stages:
                for block in stage:
                    x = block(x)
                maps.append(x)
            feats = x.mean((2, 3))
            f, p = F.normalize(feats, dim=1), F.normalize(self.proxies, dim=1)
            sim = -(f.pow(2).sum(1, keepdim=True) + p.pow(2).sum(1) - 2 * f @ p.t()).clamp(min=0)
            sim = sim.view(len(x), -1, K)
            scores = (F.softmax(sim, -1) * sim).sum(-1)
            return maps, feats, scores

    def nca(scores, y, scale, margin=0.6):
        z = scale * (scores - margin)
        z = z - z.max(1, keepdim=True).values
        target = z.gather(1, y[:, None])[:, 0]
        masked = z.scatter(1, y[:, None], 0.0)
        return (-(target - torch.logsumexp(masked, 1))).mean()

    def pod_spatial(old_maps, new_maps):
        total = 0.0
        for a, b in zip(old_maps, new_maps, strict=True):
            a, b = a.pow(2), b.pow(2)
            a = torch.cat([a.sum(3).flatten(1), a.sum(2).flatten(1)], 1)
            b = torch.cat([b.sum(3).flatten(1), b.sum(2).flatten(1)], 1)
            total = total + (F.normalize(a, dim=1) - F.normalize(b, dim=1)).norm(dim=1).mean()
        return total / len(old_maps)

    kind, size = setting["model"], setting["size"]
    batch = setting["batch"] + setting["synth"]
    new, old = Net(kind).to(device), Net(kind).to(device)
    old.load_state_dict(new.state_dict())
    old.eval()
    for p in old.parameters():
        p.requires_grad_(False)
    for p in new.parameters():
        p.register_hook(lambda g: g.clamp(-5, 5))
    opt = torch.optim.SGD(new.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    flat_w, spat_w = ((1.0, 3.0) if size == 32 else (10.0, 8.0))
    factor = math.sqrt((OLD + NEW) / NEW)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, OLD + NEW, (batch,), device=device)
    new.train()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def run(steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            maps, feats, scores = new(x)
            with torch.no_grad():
                old_maps, old_feats, _ = old(x)
            loss = (nca(scores, y, new.scale)
                    + flat_w * factor * (1 - F.cosine_similarity(old_feats, feats)).mean()
                    + spat_w * factor * pod_spatial(old_maps, maps))
            loss.backward()
            opt.step()
        sync()
        return time.perf_counter() - start

    return run, batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=0, help="timed steps per round (0 = auto)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="the project's model.dtype (PyTorch stays float32)")
    parser.add_argument("--torch-device", default="auto",
                        help="cpu, cuda, or auto (cuda when PyTorch sees a GPU)")
    args = parser.parse_args()
    try:
        if args.no_torch:
            raise ImportError
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        if args.torch_device == "auto":
            args.torch_device = "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        torch = None
    import jax

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}; jax {jax.__version__} on "
          f"{jax.devices()[0].device_kind} x{jax.device_count()}, model.dtype={args.dtype}"
          + (f"; torch {torch.__version__} on {args.torch_device} ({torch.get_num_threads()} "
             "threads)" if torch else "; torch not installed"))
    rows = []
    for name in args.settings:
        setting = SETTINGS[name]
        steps = args.steps or (10 if setting["size"] == 32 else 2)
        jrun, images, flops = jax_step(setting, dtype=args.dtype)
        trun = None
        if torch is not None:
            trun, _ = torch_step(setting, device=args.torch_device)
            trun(args.warmup)
        jrun(args.warmup)
        jax_rates, torch_rates = [], []
        for _ in range(args.rounds):
            jax_rates.append(images * steps / jrun(steps))
            if trun is not None:
                torch_rates.append(images * steps / trun(steps))
        j = statistics.median(jax_rates)
        t = statistics.median(torch_rates) if torch_rates else float("nan")
        rows.append((name, images, j, t, flops, flops * j / images))
        print(f"{name}: project {[round(r, 1) for r in jax_rates]} img/s, torch "
              f"{[round(r, 1) for r in torch_rates]} img/s", flush=True)
    print(f"\n(load average after: {os.getloadavg()[0]:.1f})")
    print("| setting | images/step | project img/s | PyTorch img/s | ratio | GFLOP/step (XLA) | "
          "achieved GFLOP/s |")
    print("|---|---|---|---|---|---|---|")
    for name, images, j, t, flops, achieved in rows:
        print(f"| {name} | {images} | {j:.1f} | {t:.1f} | {j / t:.2f} | {flops / 1e9:.2f} | "
              f"{achieved / 1e9:.1f} |")


if __name__ == "__main__":
    main()
