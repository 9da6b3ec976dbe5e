"""LIBERO fixture poses: openpi's episode sequence against kvreuse's LiberoEnv (docs/EVAL.md, LIBERO).

openpi (examples/libero/main.py) seeds the env once (seed 7), then per episode resets, sets the init
state and settles. The reset also places the fixtures (model.body_pos, not in the init state) from
numpy's global generator. LiberoEnv's scenes="openpi" (the default) gives episode k openpi's k-th layout;
scenes="first" (kvreuse before session 33) re-seeds before every reset. Prints, per episode, the largest
fixture offset between the two and how many agentview pixels differ after the settle steps.

Usage: MUJOCO_GL=osmesa python scripts/libero_fixtures.py [suite] [task index] [episodes] [openpi|first]
"""

import os
import sys

os.environ.setdefault("MUJOCO_GL", "osmesa")

import numpy as np  # noqa: E402

from kvreuse.envs.libero import DUMMY_ACTION, SETTLE_STEPS, LiberoEnv  # noqa: E402


def fixture_poses(env) -> dict:
    e = env.env
    return {name: e.sim.model.body_pos[e.sim.model.body_name2id(f.root_body)].copy()
            for name, f in e.fixtures_dict.items()}


def main(suite: str = "libero_spatial", task_i: int = 0, episodes: int = 3, scenes: str = "openpi") -> None:
    ours = LiberoEnv(suite, scenes=scenes)  # first: it writes LIBERO's config, which LIBERO's import would ask for
    from libero.libero.envs import OffScreenRenderEnv

    task = ours.tasks[task_i]
    inits = ours.init_states(task)
    ref = OffScreenRenderEnv(bddl_file_name=ours._bench.get_task_bddl_file_path(task_i),
                             camera_heights=ours.render_size, camera_widths=ours.render_size)
    print(f"{suite} task {task_i}: {task} (scenes={scenes})")
    try:  # openpi's whole sequence first: both use numpy's global generator
        ref.seed(7)
        theirs = []
        for k in range(episodes):
            ref.reset()
            ref.set_init_state(inits[k])
            for _ in range(SETTLE_STEPS):
                raw, _, _, _ = ref.step(DUMMY_ACTION)
            theirs.append((fixture_poses(ref), raw["agentview_image"].copy()))
        for k, (poses, image) in enumerate(theirs):
            ours.reset(task, k)
            mine = fixture_poses(ours._env)
            off = max(float(np.abs(poses[n] - mine[n]).max()) for n in poses)
            pixels = int((image != ours.last_raw["agentview_image"]).any(-1).sum())
            print(f"episode {k}: fixtures up to {off * 100:.2f} cm apart, {pixels} agentview pixels differ")
    finally:
        ref.close()
        ours.close()


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0] if a else "libero_spatial", int(a[1]) if len(a) > 1 else 0, int(a[2]) if len(a) > 2 else 3,
         a[3] if len(a) > 3 else "openpi")
