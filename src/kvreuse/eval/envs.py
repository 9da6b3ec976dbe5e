"""Env names the harness accepts -> EpisodeEnv instances (simulators imported lazily).

    metaworld              the embedded testbed (kvreuse.envs.metaworld)
    libero:<suite>         LIBERO, openpi's protocol (optional extra `kvreuse[libero]`)
    fake                   a simulator-free env for tests and harness benchmarks
"""

from __future__ import annotations

import difflib

LIBERO_SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")
ENV_NAMES = ("metaworld", *(f"libero:{s}" for s in LIBERO_SUITES), "fake")


def check_env_name(name: str) -> str:
    if name == "libero":
        raise ValueError(f"env 'libero' needs a suite: one of {', '.join(f'libero:{s}' for s in LIBERO_SUITES)}")
    if name.startswith("libero:") and name.split(":", 1)[1] not in LIBERO_SUITES:
        raise ValueError(f"unknown LIBERO suite {name.split(':', 1)[1]!r}; valid suites: {', '.join(LIBERO_SUITES)}")
    if name not in ENV_NAMES:
        raise ValueError(f"unknown env {name!r}; valid envs: {', '.join(ENV_NAMES)}")
    return name


def make_env(name: str, **kw):
    check_env_name(name)
    if name == "metaworld":
        from ..envs.metaworld import MetaWorldEnv

        return MetaWorldEnv(**kw)
    if name == "fake":
        from ..envs.fake import FakeEnv

        return FakeEnv(**kw)
    from ..envs.libero import LiberoEnv

    return LiberoEnv(name.split(":", 1)[1], **kw)


def check_tasks(env, tasks: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The tasks, checked, each once (in the given order): a repeated task would run its episodes twice."""
    unknown = [t for t in tasks if t not in env.tasks]
    if unknown:
        # LIBERO's names are long (libero_90 has 90): point at the likely one first.
        def likely(t: str) -> list[str]:  # libero_90: one instruction may name tasks of several scenes
            same = [n for n in env.tasks if n.endswith("_" + t.replace(" ", "_"))]
            return same or difflib.get_close_matches(t.replace(" ", "_"), env.tasks, n=1)

        close = [m for t in unknown for m in likely(t)]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown task(s) {unknown}{hint}; valid tasks: {', '.join(env.tasks)}")
    return tuple(dict.fromkeys(tasks))


def check_episodes(env, name: str, tasks, init_start: int, max_steps: int | None) -> None:
    """--init-start and --max-steps against each task's init states and step limit, before any
    work. An init id past the last would wrap round to the first ones silently; a step limit above
    the env's is cut there silently (the env's `done`), while the DB records the larger one."""
    for task in tasks:
        n = env.num_inits(task)
        if init_start >= n:
            raise ValueError(f"init_start: {init_start} is past the last init state of {name} task {task!r} "
                             f"(ids 0..{n - 1})")
        limit = env.max_steps(task)
        if max_steps is not None and max_steps > limit:
            raise ValueError(f"max_steps: {max_steps} is above {name}'s episode limit of {limit} steps "
                             f"(task {task!r}), where the env ends every episode; give at most {limit}")


def repeated_inits_note(env, episodes: int, tasks) -> str | None:
    """A note when a task has fewer init states than episodes: the ids wrap round, and the later
    episodes repeat earlier init states with other noise seeds (on LIBERO, 50 per task)."""
    over = {t: env.num_inits(t) for t in tasks if episodes > env.num_inits(t)}
    if not over:
        return None
    n = min(over.values())
    return (f"note: {episodes} episodes per task, more than the {n} init states of {len(over)} task(s): the ids "
            f"wrap round, so some episodes repeat an init state with another noise seed (not new scenes)")


def training_layouts_note(name: str, episodes) -> str | None:
    """A note when a Meta-World episode list reaches init ids >= TRAIN_INIT_START, the layouts
    `kvreuse demos` (and so the shipped testbed policies) train on: no longer a held-out score."""
    if name != "metaworld":
        return None
    from ..envs.metaworld import TRAIN_INIT_START

    seen = [i for _, i, _ in episodes if i >= TRAIN_INIT_START]
    if not seen:
        return None
    return (f"note: {len(seen)} of the {len(episodes)} episodes use Meta-World init ids >= {TRAIN_INIT_START} "
            f"(up to {max(seen)}), the layouts the testbed's demos train on; ids 0..{TRAIN_INIT_START - 1} "
            "are the held-out ones")
