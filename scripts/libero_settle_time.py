"""LIBERO's 10 settle steps: the loop that renders both cameras every step against
`LiberoEnv._settle` (cameras rendered in the last step only), alternating in one process over
init states 1..N of libero_spatial's first task; also one rendering policy step and a whole reset, with
LiberoEnv's soft reset and with LIBERO's hard reset (which rebuilds the model and GL context).
Needs the LIBERO install (scripts/install_libero.sh) and MUJOCO_GL (osmesa on a CPU machine).

    MUJOCO_GL=osmesa PYTHONPATH=src python scripts/libero_settle_time.py [N]
"""
import sys
import time

import numpy as np

from kvreuse.envs import libero as L


def main(n: int) -> None:
    env = L.LiberoEnv("libero_spatial")
    task = env.tasks[0]
    env.reset(task, 0)  # builds the env (not timed)
    hard = L.LiberoEnv("libero_spatial", hard_reset=True)
    hard.reset(task, 0)
    res = {"settle, rendering every step": [], "settle, LiberoEnv._settle": [], "one policy step": [],
           "whole reset()": [], "whole reset(), hard_reset=True": []}
    for i in range(1, n + 1):
        for loop in ("old", "new"):
            env._fresh_sim()
            env._env.set_init_state(env.init_states(task)[i])
            t0 = time.perf_counter()
            if loop == "old":
                for _ in range(L.SETTLE_STEPS):
                    env._env.step(L.DUMMY_ACTION)
            else:
                env._settle()
            key = "settle, rendering every step" if loop == "old" else "settle, LiberoEnv._settle"
            res[key].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        env._env.step(L.DUMMY_ACTION)
        res["one policy step"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        env.reset(task, i)
        res["whole reset()"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        hard.reset(task, i)
        res["whole reset(), hard_reset=True"].append(time.perf_counter() - t0)
    for k, v in res.items():
        print(f"{k}: {' '.join(f'{x:.2f}' for x in v)} s (mean {np.mean(v):.2f})")
    env.close()
    hard.close()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 4)
