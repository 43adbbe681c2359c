"""Every project error survives a pickle round trip intact (it crosses Ray's worker boundary),
and a worker's failure reaches the driver as the same one-line error."""
from __future__ import annotations

import importlib
import inspect
import pickle
import pkgutil

import pytest

import pipeline
import stages
from stages.records import AnimError, NodeError, StageError


def all_error_classes() -> list[type[AnimError]]:
    """AnimError and every subclass defined anywhere in pipeline/ and stages/ (imported here, so a
    new error class is checked without being listed)."""
    for package in (pipeline, stages):
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            if info.name.endswith(("__main__", "diffusion", "rife")):
                continue  # the CLI entry point; the torch backends import heavy modules (covered by their tests)
            importlib.import_module(info.name)
    out, todo = [], [AnimError]
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo += cls.__subclasses__()
    return sorted(set(out), key=lambda c: f"{c.__module__}.{c.__qualname__}")


def example(cls: type[AnimError]) -> AnimError:
    """An instance built from its own signature: each parameter a distinct value of its kind."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    if any(p.kind is p.VAR_POSITIONAL for p in params) or not params:
        return cls(f"{cls.__name__}: something went wrong in [bold]shot[/bold]")
    args = []
    for i, p in enumerate(params):
        if p.kind in (p.VAR_KEYWORD,):
            continue
        ann = str(p.annotation)
        args.append(i + 3 if "int" in ann and "str" not in ann else f"{p.name}-{i}")
    return cls(*args)


@pytest.mark.parametrize("cls", all_error_classes(), ids=lambda c: c.__qualname__)
def test_every_project_error_round_trips_through_pickle(cls):
    err = example(cls)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls and str(back) == str(err) and back.args == err.args
    assert vars(back) == vars(err)


def test_the_error_classes_include_every_kind():
    names = {c.__name__ for c in all_error_classes()}
    assert {"AnimError", "ScriptError", "ProfileError", "StageError", "NodeError", "StoreError"} <= names


def test_a_worker_failure_reaches_the_driver_as_the_same_error():
    import ray

    from pipeline.dag import Cluster, get
    from pipeline.nodes import failing_as
    from pipeline.schedule import NodeId

    Cluster().start()

    @ray.remote
    def encode_fails() -> None:
        with failing_as(NodeId("clip", "sc01-sh01")):
            raise StageError("encode", "sc01-sh01", "ffmpeg exited 1", stderr="Invalid argument")

    with pytest.raises(NodeError) as err:
        get(encode_fails.remote(), NodeId("clip", "sc01-sh01"))
    assert str(err.value).startswith("clip[sc01-sh01]: encode[sc01-sh01]: ffmpeg exited 1")
    assert "Invalid argument" in str(err.value) and "StageError" in err.value.remote_traceback
