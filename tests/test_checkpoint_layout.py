"""Checkpoint layout records and atomic commits, without any process group.

* The shard manifest: every decoder architecture is patched "as" each tp rank of a layout (a mesh
  without process groups: patching sends nothing), the ranks' local tensors are assembled into
  the dense model (bit for bit equal to the unpatched state dict) and cut out again for another
  layout (bit for bit equal to that layout's own patch).
* The save protocol: ``commit`` runs in a forked child that SIGKILLs itself at each window
  (``DS_TWOLEVEL_TEST_KILL_AT``); after every kill ``latest`` names a complete checkpoint, the
  resume (no ``tag=``) picks it, and the next save leaves nothing stale behind.
"""
from __future__ import annotations

import copy
import os
import signal
from pathlib import Path

import pytest
import torch

from ds_twolevel.deepspeed import checkpoint as checkpointing
from ds_twolevel.parallel.layout import AxisGroup, TwoLevelAxes, TwoLevelLayout, TwoLevelMesh
from ds_twolevel.sharding.shard_manifest import ShardManifest, assemble, extract, manifest_for, model_differences, same_shards
from hf_integration import patch_model
from hf_integration.testing import DECODERS, tiny_model


# -- the manifest -------------------------------------------------------------------------------------
def fake_mesh(n: int, m: int, tp_rank: int, kv_heads: int | None = None) -> TwoLevelMesh:
    """Rank ``tp_rank``'s view of an n x m layout, without process groups (patching sends nothing)."""
    i, j = divmod(tp_rank, m)
    axes = TwoLevelAxes(AxisGroup("m", m, j), AxisGroup("n", n, i), AxisGroup("tp", n * m, tp_rank))
    mesh = TwoLevelMesh(TwoLevelLayout(n=n, m=m), None, axes)
    if kv_heads is not None and n > kv_heads:  # n > KV heads: each KV head lives on n/g head groups
        reps = n // kv_heads
        mesh._axes_by_kv[kv_heads] = TwoLevelAxes(axes.seg, axes.heads, axes.tp,
                                                  kv_rep=AxisGroup("kv_rep", reps, i % reps))
    return mesh


def patched_ranks(model, n: int, m: int, **kw) -> list:
    """The model patched as each of the n*m tp ranks."""
    out = []
    for r in range(n * m):
        copy_ = copy.deepcopy(model)
        mesh = fake_mesh(n, m, r, model.config.num_key_value_heads if kw else None)
        patch_model(copy_, mesh, probe=False, **kw)  # the probe is collective; these ranks have no group
        out.append(copy_)
    return out


def _equal(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return [k for k in b if not torch.equal(a[k], b[k])]


@pytest.mark.parametrize("arch", DECODERS)
def test_manifest_assembles_and_reshards_every_architecture(arch):
    """2 x 2 shards -> dense (== the unpatched state dict) -> 2 x 1 shards (== that layout's patch)."""
    dense = tiny_model(arch)
    ranks = patched_ranks(dense, 2, 2)
    manifest = manifest_for(ranks[0], (1, 2, 2))
    assert ShardManifest.from_json(manifest.to_json()) == manifest
    assembled = assemble(manifest, [r.state_dict() for r in ranks])
    assert not _equal(assembled, dense.state_dict()), arch
    others = patched_ranks(dense, 2, 1)
    other = manifest_for(others[0], (2, 2, 1))
    assert not same_shards(manifest, other) and not model_differences(manifest, other)
    for r, model in enumerate(others):
        assert not _equal(extract(other, assembled, r), model.state_dict()), (arch, r)


def test_manifest_with_replicated_kv_heads():
    """n = 4 > 2 KV heads: each KV head is held by two head groups; assembling still gives the dense model."""
    dense = tiny_model("llama")
    ranks = patched_ranks(dense, 4, 1, kv_replication=True)
    manifest = manifest_for(ranks[0], (1, 4, 1))
    assert not _equal(assemble(manifest, [r.state_dict() for r in ranks]), dense.state_dict())


def test_manifest_names_what_differs():
    """Another model (other shapes, other tensors) is told apart from another layout of the same model."""
    a = manifest_for(patched_ranks(tiny_model("qwen3"), 1, 2)[0], (1, 1, 2))
    b = manifest_for(patched_ranks(tiny_model("qwen3", intermediate_size=64), 1, 2)[0], (1, 1, 2))
    c = manifest_for(patched_ranks(tiny_model("llama"), 1, 2)[0], (1, 1, 2))
    assert model_differences(a, a) == [] and same_shards(a, a)
    assert model_differences(a, b)[0] == "model.layers.0.mlp.down_proj.weight: checkpoint (64, 128) vs model (64, 64)"
    assert any("not in the checkpoint" in d for d in model_differences(c, a))
    with pytest.raises(ValueError, match="is not 'ds_twolevel.checkpoint/1'"):
        ShardManifest.from_json('{"format": "other"}', source="x/two_level.json")
    shards = [r.state_dict() for r in patched_ranks(tiny_model("qwen3"), 1, 2)]
    name = "model.layers.1.mlp.up_proj.weight"
    entry = a.entries[name]
    holes = ShardManifest(a.layout, a.dense, {**a.entries, name: type(entry)(entry.key, 0, False,
                                                                               (entry.runs[0], ((64, 96),)))})
    with pytest.raises(ValueError, match=f"{name}: 32 of 128 positions are held by no shard"):
        assemble(holes, [shards[0], {**shards[1], name: shards[1][name][:32]}])


def test_manifest_records_ulysses_sp():
    """sp (Ulysses' sequence shards) is part of the layout: ZeRO's files are dp x sp per tp rank, the same shards
    at another sp are resharded, and a record without sp reads as sp = 1."""
    import json

    a = manifest_for(patched_ranks(tiny_model("qwen3"), 1, 2)[0], (1, 1, 2), sp=2)
    assert (a.describe(), a.zero_size) == ("dp=1 x sp=2 x n=1 x m=2", 2)
    assert ShardManifest.from_json(a.to_json()) == a
    b = manifest_for(patched_ranks(tiny_model("qwen3"), 1, 2)[0], (2, 1, 2))
    assert (b.describe(), b.zero_size) == ("dp=2 x n=1 x m=2", 2)
    assert not same_shards(a, b) and not model_differences(a, b)
    assert json.loads(b.to_json())["layout"] == {"dp": 2, "n": 1, "m": 2}  # sp = 1 is written as before sp existed
    assert ShardManifest.from_json(b.to_json()).sp == 1


# -- the save protocol --------------------------------------------------------------------------------
FILES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt")
RESAVE = ("linking", "linked", "latest_old", "removing", "removed", "replaced", "committed")
FRESH = ("renamed", "committed")


def write_checkpoint(path: Path, version: str, saved_at: int, manifest: bool = True) -> None:
    """A stand-in tag directory: DeepSpeed-like files holding ``version``, then the manifest."""
    path.mkdir(parents=True)
    for name in FILES:
        (path / name).write_text(version)
    if manifest:
        info = {"saved_at_ns": saved_at, "zero_stage": 1}
        checkpointing.write_atomic(path / "two_level.json", ShardManifest((1, 1, 1), {}, {}, info).to_json())


def save(save_dir: Path, tag: str, version: str, saved_at: int, window: str | None = None) -> int:
    """What ``save_checkpoint``'s committing rank does around DeepSpeed's write: drop a stale
    ``<tag>.partial``, (DeepSpeed writes it,) commit. With ``window``, the commit is killed there."""
    checkpointing.remove_checkpoint(save_dir / f"{tag}.partial")
    write_checkpoint(save_dir / f"{tag}.partial", version, saved_at)
    if window is None:
        checkpointing.commit(save_dir, tag)
        return 0
    return commit_killed_at(save_dir, tag, window)


def version_of(path: Path) -> str:
    versions = {(path / name).read_text() for name in FILES}
    assert len(versions) == 1 and checkpointing.is_complete(path), f"{path} is not a complete checkpoint"
    return versions.pop()


def commit_killed_at(save_dir: Path, tag: str, window: str) -> int:
    """``commit`` in a forked child told to SIGKILL itself at ``window``; returns the signal it died of."""
    pid = os.fork()
    if pid == 0:  # child: no pytest machinery, just the protocol
        os.environ[checkpointing.KILL_ENV] = window
        try:
            checkpointing.commit(save_dir, tag)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0


def check_resumable(save_dir: Path, expect: str) -> None:
    """``latest`` names a complete checkpoint, and the resume (no ``tag=``) picks it, as DeepSpeed does."""
    latest = checkpointing.read_latest(save_dir)
    version_of(save_dir / latest)
    assert version_of(save_dir / checkpointing.find_checkpoint(save_dir)) == expect


def check_clean(save_dir: Path, tags: set[str]) -> None:
    assert {p.name for p in save_dir.iterdir()} == tags | {"latest"}, sorted(p.name for p in save_dir.iterdir())


@pytest.mark.parametrize("window", RESAVE)
def test_resave_into_existing_tag_killed_in_every_window(tmp_path, window):
    """A finished run re-saved into the same tag (``--resume`` of a completed run), killed at ``window``."""
    save(tmp_path, "global_step2", "v1", 1)
    assert save(tmp_path, "global_step2", "v2", 2, window) == signal.SIGKILL
    # until ``latest`` names the new copy the save is not complete: the resume takes the old one
    check_resumable(tmp_path, "v2" if window == "committed" else "v1")
    # the next save of the same tag (after the resume) succeeds and leaves nothing behind
    save(tmp_path, "global_step2", "v3", 3)
    check_resumable(tmp_path, "v3")
    check_clean(tmp_path, {"global_step2"})


@pytest.mark.parametrize("window", FRESH)
def test_save_of_new_tag_killed_in_every_window(tmp_path, window):
    save(tmp_path, "global_step2", "v1", 1)
    assert save(tmp_path, "global_step4", "v2", 2, window) == signal.SIGKILL
    check_resumable(tmp_path, "v2" if window == "committed" else "v1")  # the resume follows ``latest``
    save(tmp_path, "global_step6", "v3", 3)
    check_resumable(tmp_path, "v3")
    check_clean(tmp_path, {"global_step2", "global_step4", "global_step6"})


@pytest.mark.parametrize("manifest", [False, True], ids=["written", "marked"])
def test_killed_before_commit_leaves_previous_checkpoint(tmp_path, manifest):
    """Killed while DeepSpeed wrote ``<tag>.partial`` ('written') or right after the manifest ('marked'):
    the partial directory is ignored by the resume and removed by the next save."""
    save(tmp_path, "global_step2", "v1", 1)
    write_checkpoint(tmp_path / "global_step4.partial", "v2", 2, manifest=manifest)
    (tmp_path / ".latest.tmp123").write_text("global_step4")  # a write_atomic killed before its rename
    check_resumable(tmp_path, "v1")
    save(tmp_path, "global_step6", "v3", 3)
    check_clean(tmp_path, {"global_step2", "global_step6"})


def test_no_checkpoint_is_one_line(tmp_path):
    """The state a killed save can leave (latest naming a tag of which only .old and .partial exist, no
    manifest anywhere: an older ds_twolevel) and an empty directory: one line naming what is there."""
    (tmp_path / "global_step2.old").mkdir()
    (tmp_path / "global_step2.partial").mkdir()
    (tmp_path / "latest").write_text("global_step2")
    with pytest.raises(ValueError) as err:
        checkpointing.find_checkpoint(tmp_path)
    assert str(err.value) == (f"no checkpoint to resume in {str(tmp_path)!r} ('latest' names 'global_step2', which is "
                              f"missing; tags: global_step2.old, global_step2.partial); save one with "
                              f"ds_twolevel.save_checkpoint, or pass tag=")
    with pytest.raises(ValueError, match="no 'latest' file; tags: none"):
        checkpointing.find_checkpoint(tmp_path / "empty")


def test_resume_follows_latest_whatever_the_other_tags_say(tmp_path):
    """``latest`` names global_step4: an older tag saved "later" (saved_at_ns) or with a truncated
    record does not change the choice; without ``latest`` the tags are listed and ``tag=`` asked for."""
    save(tmp_path, "global_step2", "v1", 1)
    save(tmp_path, "global_step4", "v2", 2)
    older = tmp_path / "global_step2" / "two_level.json"
    checkpointing.write_atomic(older, ShardManifest((1, 1, 1), {}, {}, {"saved_at_ns": 10 ** 20}).to_json())
    assert checkpointing.find_checkpoint(tmp_path) == "global_step4"
    older.write_text(older.read_text()[:40])
    assert checkpointing.find_checkpoint(tmp_path) == "global_step4"
    (tmp_path / "latest").unlink()
    with pytest.raises(ValueError, match=r"\(no 'latest' file; tags: global_step2, global_step4\); save one with "
                                         r"ds_twolevel.save_checkpoint, or pass tag="):
        checkpointing.find_checkpoint(tmp_path)
