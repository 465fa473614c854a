"""The model repository's publishing (runtime/gpu_server/repository.py): each registration a
new version folder made current by one symlink rename, readers that resolve a name once and
read one version, collection of superseded versions after a grace period, and the
``torpor model register / list / unregister`` commands."""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import models
from runtime.gpu_server.repository import (STAGING, VERSIONS, ModelLoadError, Repository, VersionGone, build,
                                           command)
from runtime.gpu_server.store import ModelStore

LONG_AGO = 1_000_000_000  # an mtime (2001) older than any grace period


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def output(module, arrays) -> np.ndarray:
    return models.native(module, arrays)[0]


def versions(repo: Repository) -> set[str]:
    return {p.name for p in (repo.root / VERSIONS).iterdir()}


def test_a_registration_is_a_version_folder_behind_a_relative_symlink(repo):
    models.register(repo, "m", "resnet")
    link = repo.root / "m"
    target = os.readlink(link)
    assert link.is_symlink() and target.startswith(f"{VERSIONS}/m-") and not os.path.isabs(target)
    spec = repo.spec("m")
    assert Path(spec.path) == repo.resolve("m") == (repo.root / target).resolve()
    assert sorted(p.name for p in Path(spec.path).iterdir()) == ["layout.json", "model.json", "model.safetensors"]
    assert repo.names() == ["m"] and not list((repo.root / STAGING).iterdir())


def test_readers_racing_registrations_always_read_one_whole_version(repo, tmp_path):
    arrays = models.inputs("resnet", seed=1)
    natives = [models.build("resnet", seed=s) for s in (1, 2)]
    weights = [models.save(m, tmp_path / f"w{i}.safetensors") for i, m in enumerate(natives)]
    wanted = [output(m, arrays) for m in natives]
    repo.register(models.spec("m", "resnet"), weights[0])
    stop, errors, seen = threading.Event(), [], [0, 0]

    def read() -> None:
        try:
            while not stop.is_set():
                got = output(build(repo.spec("m")), arrays)
                seen[next(i for i, w in enumerate(wanted) if np.array_equal(got, w))] += 1
        except BaseException as exc:  # collected: any failure fails the test
            errors.append(exc)

    readers = [threading.Thread(target=read) for _ in range(2)]
    for t in readers:
        t.start()
    for i in range(12):
        repo.register(models.spec("m", "resnet"), weights[i % 2])
    stop.set()
    for t in readers:
        t.join(30)
    assert not errors, errors[:3]
    assert seen[0] and seen[1], seen


def test_a_reader_that_resolved_a_version_reads_it_after_a_newer_one_is_published(repo, tmp_path):
    arrays = models.inputs("resnet", seed=1)
    old = models.register(repo, "m", "resnet", seed=1)
    resolved = repo.spec("m")
    new = models.register(repo, "m", "resnet", seed=2)
    assert np.array_equal(output(build(resolved), arrays), output(old, arrays))
    assert np.array_equal(output(build(repo.spec("m")), arrays), output(new, arrays))


def test_superseded_versions_are_collected_after_the_grace_period_only(repo):
    models.register(repo, "m", "resnet", seed=1)
    first = repo.resolve("m")
    models.register(repo, "m", "resnet", seed=2)
    second = repo.resolve("m")
    assert versions(repo) == {first.name, second.name}  # within the grace period both stay
    for version in (first, second):
        os.utime(version, (LONG_AGO, LONG_AGO))
    assert repo.collect() == [repo.root / VERSIONS / first.name]
    assert versions(repo) == {second.name}  # the current version is never collected, however old


def test_a_reader_whose_version_was_collected_is_told_to_resolve_again(repo):
    arrays = models.inputs("resnet", seed=1)
    models.register(repo, "m", "resnet", seed=1)
    stale = repo.spec("m")
    new = models.register(repo, "m", "resnet", seed=2)
    assert Repository(repo.root, grace_s=0).collect() == [Path(stale.path)]
    with pytest.raises(VersionGone, match="collected"):
        build(stale)

    class ResolvedBeforeTheCollection(Repository):
        """Hands the store the stale spec once, as if it had resolved the name just before."""

        def spec(self, name):
            if getattr(self, "stale", None):
                spec, self.stale = self.stale, None
                return spec
            return super().spec(name)

    racing = ResolvedBeforeTheCollection(repo.root)
    racing.stale = stale
    store = ModelStore(racing, pin=False)
    loaded = store.get("m")
    assert loaded.spec.path == str(repo.resolve("m"))
    module = loaded.instantiate(loaded.buffer)
    assert np.array_equal(output(module, arrays), output(new, arrays))


def test_unregister_removes_the_name_at_once_and_its_files_after_the_grace(repo):
    models.register(repo, "m", "resnet")
    resolved = repo.spec("m")
    repo.unregister("m")
    assert repo.names() == [] and not (repo.root / "m").exists() and not (repo.root / "m").is_symlink()
    with pytest.raises(KeyError):
        repo.spec("m")
    with pytest.raises(KeyError):
        repo.unregister("m")
    build(resolved)  # a load that resolved it before still finishes
    os.utime(resolved.path, (LONG_AGO, LONG_AGO))
    repo.collect()
    assert versions(repo) == set()


def test_a_failed_registration_leaves_nothing_and_keeps_the_current_version(repo, tmp_path):
    models.register(repo, "m", "resnet", seed=1)
    current = repo.resolve("m")
    spec = models.spec("m", "resnet")
    spec.inputs[0].shape = [1, 4, 32, 32]  # four channels into a three-channel stem
    with pytest.raises(ModelLoadError, match="declared inputs"):
        repo.register(spec, models.save(models.build("resnet", seed=2), tmp_path / "w.safetensors"))
    assert repo.resolve("m") == current and versions(repo) == {current.name}
    assert not list((repo.root / STAGING).iterdir())


@pytest.mark.parametrize("name, words", [
    ("", "non-empty"), (".versions", "leading '.'"), ("a/b", "no '/'"), ("..", "leading '.'"),
    (".hidden", "leading '.'"), ("a\x00b", "NUL"), ("\ud800", "lone surrogate"), ("m" * 201, "over the limit of 200"),
])
def test_names_that_would_escape_hide_or_not_fit_are_refused(repo, tmp_path, name, words):
    weights = models.save(models.build("resnet"), tmp_path / "w.safetensors")
    with pytest.raises(ModelLoadError, match=words):
        repo.register(models.spec(name, "resnet"), weights)
    assert not (repo.root / STAGING).exists() or not list((repo.root / STAGING).iterdir())


def test_a_plain_folder_is_served_as_is_and_becomes_a_version_when_registered_over(repo, tmp_path):
    arrays = models.inputs("resnet", seed=1)
    hand_made = repo.folder("m")
    hand_made.mkdir()
    old = models.build("resnet", seed=1)
    models.save(old, hand_made / "model.safetensors")
    models.spec("m", "resnet").write(hand_made)
    assert repo.names() == ["m"] and np.array_equal(output(build(repo.spec("m")), arrays), output(old, arrays))
    new = models.register(repo, "m", "resnet", seed=2)
    assert (repo.root / "m").is_symlink() and len(versions(repo)) == 2  # the old folder waits out the grace
    assert np.array_equal(output(build(repo.spec("m")), arrays), output(new, arrays))


def test_concurrent_registrations_of_one_name_leave_one_current_version(repo, tmp_path):
    weights = [models.save(models.build("resnet", seed=s), tmp_path / f"w{s}.safetensors") for s in range(4)]
    errors = []

    def register(w: Path) -> None:
        try:
            repo.register(models.spec("m", "resnet"), w)
        except BaseException as exc:  # collected: any failure fails the test
            errors.append(exc)

    threads = [threading.Thread(target=register, args=(w,)) for w in weights]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert repo.names() == ["m"] and len(versions(repo)) == 4
    assert repo.spec("m").digest in {json.loads((repo.root / VERSIONS / v / "model.json").read_text())["digest"]
                                     for v in versions(repo)}
    assert not list((repo.root / STAGING).iterdir())


def test_model_commands_register_list_and_unregister(tmp_path):
    root = str(tmp_path / "models")
    weights = models.save(models.build("resnet"), tmp_path / "w.safetensors")
    runner = CliRunner()
    tiny = models.TINY["resnet"]
    registered = runner.invoke(command, [
        "register", "m", "--architecture", tiny.architecture, "--config", json.dumps(tiny.config),
        "--weights", str(weights), "--input", "pixel_values:float32:1x3x32x32", "--model-repo", root])
    assert registered.exit_code == 0, registered.output
    reply = json.loads(registered.output)
    assert reply["name"] == "m" and reply["bytes"] > 0 and len(reply["digest"]) == 64
    listed = runner.invoke(command, ["list", "--model-repo", root])
    assert listed.exit_code == 0 and listed.output.split("\t")[:2] == ["m", "safetensors"]
    removed = runner.invoke(command, ["unregister", "m", "--model-repo", root])
    assert removed.exit_code == 0 and json.loads(removed.output) == {"name": "m", "unregistered": True}
    assert runner.invoke(command, ["list", "--model-repo", root]).output == ""
    again = runner.invoke(command, ["unregister", "m", "--model-repo", root])
    assert again.exit_code == 1 and "no model 'm'" in again.output


@pytest.mark.parametrize("args, words", [
    (["--config", "{bad"], "--config"),
    (["--config", "[1]"], "must be a JSON object"),
    (["--input", "pixel_values:float99:1x3x32x32"], "unknown dtype 'float99'"),
    (["--input", "pixel_values:float32:1x0x32x32"], "dimensions must be positive"),
    (["--input", "pixel_values:float32:1x99999999999999999999"], "more than 2147483648 elements"),
    (["--name", "m" * 240], "over the limit of 200 bytes"),
    (["--gpu-socket", "/nonexistent/gpu.sock"], "is registered in"),
])
def test_model_register_mistakes_are_clean_errors(tmp_path, args, words):
    tiny = models.TINY["resnet"]
    weights = models.save(models.build("resnet"), tmp_path / "w.safetensors")
    base = {"--architecture": tiny.architecture, "--config": json.dumps(tiny.config), "--weights": str(weights),
            "--input": "pixel_values:float32:1x3x32x32", "--model-repo": str(tmp_path / "models"), "--name": "m"}
    base.update(dict(zip(args[::2], args[1::2])))
    name = base.pop("--name")
    argv = ["register", name] + [x for kv in base.items() for x in kv]
    result = CliRunner().invoke(command, argv)
    assert result.exit_code in (1, 2) and words in result.output, result.output
    assert isinstance(result.exception, SystemExit)  # a usage or click error, no traceback


def test_model_register_refuses_repeated_input_names(tmp_path):
    tiny = models.TINY["resnet"]
    weights = models.save(models.build("resnet"), tmp_path / "w.safetensors")
    result = CliRunner().invoke(command, [
        "register", "m", "--architecture", tiny.architecture, "--config", json.dumps(tiny.config),
        "--weights", str(weights), "--input", "x:float32:1x3x32x32", "--input", "x:float32:1x3x32x32",
        "--model-repo", str(tmp_path / "models")])
    assert result.exit_code == 2 and "input names repeat" in result.output


def test_the_store_serves_a_registration_it_was_not_told_about(repo, monkeypatch, tmp_path):
    from runtime.gpu_server import store as store_module
    monkeypatch.setattr(store_module, "VERSION_CHECK_S", 0.0)
    store = ModelStore(repo, pin=False)
    old = models.register(repo, "m", "resnet", seed=1)
    x = models.inputs("resnet")
    first = store.get("m")
    assert first is store.get("m")  # unchanged version: the loaded model, not a reload
    assert output(first.instantiate(first.buffer), x).tolist() == output(old, x).tolist()
    new = models.register(repo, "m", "resnet", seed=2)  # straight into the repository
    second = store.get("m")
    assert second is not first
    assert output(second.instantiate(second.buffer), x).tolist() == output(new, x).tolist()
    repo.unregister("m")
    with pytest.raises(KeyError):
        store.get("m")
    assert store.loaded() == []


def test_a_failed_load_is_retried_once_a_new_version_is_registered(repo, monkeypatch, tmp_path):
    from runtime.gpu_server import store as store_module
    monkeypatch.setattr(store_module, "VERSION_CHECK_S", 0.0)
    native = models.register(repo, "m", "resnet")
    weights = models.save(native, tmp_path / "same.safetensors")
    broken = Path(repo.spec("m").path) / "model.safetensors"
    broken.write_bytes(broken.read_bytes()[:100])  # the files break on disk
    store = ModelStore(repo, pin=False)
    for _ in range(3):
        with pytest.raises(ModelLoadError):
            store.get("m")
    repo.register(models.spec("m", "resnet"), weights)  # the same file again: a new version
    model = store.get("m")
    assert output(model.instantiate(model.buffer), models.inputs("resnet")).tolist() == \
        output(native, models.inputs("resnet")).tolist()
