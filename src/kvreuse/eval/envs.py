"""Env names the harness accepts -> EpisodeEnv instances (simulators imported lazily).

    metaworld              the embedded testbed (kvreuse.envs.metaworld)
    libero:<suite>         LIBERO, openpi's protocol (optional extra `kvreuse[libero]`)
    fake                   a simulator-free env for tests and harness benchmarks
"""

from __future__ import annotations

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
        raise ValueError(f"unknown task(s) {unknown}; valid tasks: {', '.join(env.tasks)}")
    return tuple(dict.fromkeys(tasks))
