"""The scripted Meta-World experts on held-out and training layouts (docs/TESTBED.md, "The testbed").

Runs each task's expert, without the demos' action noise, on init ids 0-19 (held-out) and 50-69
(training) and prints its successes and the steps its episodes took.

Usage: MUJOCO_GL=osmesa python scripts/expert_check.py
"""

import time

from kvreuse.envs.metaworld import TASKS, MetaWorldEnv, expert_policy

IDS = [*range(20), *range(50, 70)]


def main() -> None:
    env = MetaWorldEnv(render=False)  # the expert reads the simulator's state, not the cameras
    t0, every = time.perf_counter(), []
    for task in TASKS:
        expert, ok, steps = expert_policy(task), 0, []
        for i in IDS:
            env.reset(task, i, 0)
            done = success = False
            while not done:
                _, success, done = env.step(expert.get_action(env.raw_obs))
            ok += bool(success)
            steps.append(env.steps)
        every += steps
        print(f"{task:<26} {ok}/{len(IDS)} succeeded, {min(steps)}-{max(steps)} steps", flush=True)
    print(f"all tasks: {min(every)}-{max(every)} steps per episode ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
