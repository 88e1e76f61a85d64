"""Run method / synthetic-data arms on the quickstart scenario and print their accuracies.

    python benchmarks/quickstart_arms.py --arms issue2 --seeds 0
    python benchmarks/quickstart_arms.py --arms issue3 --seeds 0 1 2

Every arm is ``configs/quickstart.py`` plus the overrides listed below (the same overrides work on
the command line as ``--config.<key>=<value>``). Prints a markdown table of the last and average
incremental accuracies (CNN), mean and standard deviation over the seeds.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

ARMS = {
    "issue2": {
        "finetune": {"method.name": "finetune", "synthetic.use_in": "none"},
        "replay": {"method.name": "replay", "synthetic.use_in": "none"},
        "replay + real_holdout synthetic (classification)": {
            "method.name": "replay", "synthetic.use_in": "classification",
            "generation.backend": "real_holdout"},
        "joint": {"method.name": "joint", "synthetic.use_in": "none"},
    },
    "issue3": {
        "finetune": {"method.name": "finetune", "synthetic.use_in": "none"},
        "podnet": {"method.name": "podnet", "synthetic.use_in": "none"},
        "podnet + distillation": {"method.name": "podnet", "synthetic.use_in": "distillation",
                                  "generation.backend": "real_holdout"},
        "podnet + classification": {"method.name": "podnet", "synthetic.use_in": "classification",
                                    "generation.backend": "real_holdout"},
        "podnet + both": {"method.name": "podnet", "synthetic.use_in": "both",
                          "generation.backend": "real_holdout"},
        "podnet, replace_memory": {"method.name": "podnet", "synthetic.use_in": "none",
                                   "synthetic.replace_memory": True,
                                   "generation.backend": "real_holdout"},
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", choices=sorted(ARMS), default="issue3")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs",
                                                          "quickstart.py"))
    parser.add_argument("--workdir", default="", help="where runs go (default: a temp dir)")
    args = parser.parse_args()

    import sdcil_jax
    from sdcil_jax.config import load_config_file

    root = args.workdir or tempfile.mkdtemp(prefix="sdcil_arms_")
    rows = []
    for name, overrides in ARMS[args.arms].items():
        last, avg = [], []
        start = time.perf_counter()
        for seed in args.seeds:
            config = load_config_file(args.config)
            config.seed = seed
            for key, value in overrides.items():
                section, field = key.split(".")
                config[section][field] = value
            slug = name.replace(" ", "_").replace(",", "").replace("+", "p").replace("(", "").replace(")", "")
            res = sdcil_jax.run(config, os.path.join(root, f"{slug}_seed{seed}"), progress=False)
            last.append(res["last_accuracy"])
            avg.append(res["avg_incremental_accuracy"])
        rows.append((name, overrides, last, avg, time.perf_counter() - start))

    print(f"\nseeds: {args.seeds}; runs in {root}\n")
    print("| arm | overrides | last acc. | avg. incr. acc. | wall s |")
    print("|---|---|---|---|---|")
    for name, overrides, last, avg, secs in rows:
        ov = " ".join(f"{k}={v}" for k, v in overrides.items())
        print(f"| {name} | `{ov}` | {np.mean(last):.2f} ± {np.std(last):.2f} | "
              f"{np.mean(avg):.2f} ± {np.std(avg):.2f} | {secs:.0f} |")


if __name__ == "__main__":
    main()
