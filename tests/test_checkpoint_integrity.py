"""Checkpoint integrity: files that do not belong to their tag, damaged manifests, the tag a resume
takes, and saves that the file system refuses.

One 2-rank job (a tiny Llama at dp1 x n1 x m2, ZeRO-1, saved at steps 1 and 2; a second engine over
the same ranks at dp2 x n1 x m1 for resharded loads) runs every multi-rank case; each refusal must
be the same one line on both ranks and leave the engine's weights as they were:

* tp-rank-1 files of global_step1 copied into global_step2: refused at the same layout (DeepSpeed's
  own ``engine.load_checkpoint``) and with resharding, naming the file, its rank and global_step1;
* a ``two_level.json`` with the tp ranks of a q_proj entry swapped, an entry deleted, a run out of range;
* an older tag whose ``saved_at_ns`` is newer, and an older tag whose ``two_level.json`` is truncated,
  while ``latest`` names global_step2: global_step2 is loaded (the weights saved at step 2);
* full disk (a tmpfs smaller than the save), a file-size limit hit while DeepSpeed writes (only on
  rank 1), a read-only file system: one line on both ranks naming the directory and the bytes the
  save needs; nothing of the failed tag is left, and the next save succeeds.

The file-system cases mount tmpfs file systems (root, as in CI); where mounting is not permitted
they are reported as skipped. Pure tests below cover the manifest checks without a process group.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VOCAB = 96
Q_PROJ = "q_proj"
"""the swapped entry: the first sharded entry whose dense tensor is a q_proj weight."""


def ds_config(n: int, m: int) -> dict:
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
            "zero_optimization": {"stage": 1}, "steps_per_print": 10 ** 9,
            "two_level": {"n": n, "m": m, "strategy": "cost_model", "timeout_s": 120}}


# -- rank side ------------------------------------------------------------------------------------------
def _engine(n: int, m: int, seed: int):
    import ds_twolevel
    from hf_integration.testing import tiny_model

    cfg = ds_config(n, m)
    mesh = ds_twolevel.build_mesh(cfg)
    engine, *_ = ds_twolevel.initialize(model=tiny_model("llama", seed=seed).train(), config=cfg, mesh=mesh)
    return engine


def _step(engine, step: int) -> None:
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(step))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()


def _attempt(fn) -> str:
    try:
        fn()
    except ValueError as err:  # AgreementError is a ValueError
        return str(err)
    return "NOT REFUSED"


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _edit_manifest(path: Path, edit, redigest: bool) -> str:
    """Apply ``edit(raw) -> entry name`` to a two_level.json; with ``redigest`` as a tool rewriting it
    would (a consistent digest), else keeping the saved digest."""
    from ds_twolevel.sharding.shard_manifest import DIGEST, _digest

    raw = json.loads(path.read_text())
    name = edit(raw)
    if redigest:
        raw["info"][DIGEST] = _digest(raw)
    path.write_text(json.dumps(raw, indent=1))
    return name


def _swap_q(raw: dict) -> str:
    name = next(k for k, e in raw["entries"].items() if Q_PROJ in e["key"] and e["dim"] is not None)
    raw["entries"][name]["runs"] = raw["entries"][name]["runs"][::-1]
    return name


def _delete_o(raw: dict) -> str:
    name = next(k for k, e in raw["entries"].items() if "o_proj" in e["key"])
    del raw["entries"][name]
    return name


def _out_of_range(raw: dict) -> str:
    name = next(k for k, e in raw["entries"].items() if "o_proj" in e["key"] and e["dim"] is not None)
    raw["entries"][name]["runs"][1] = [[1030, 1036]]
    return name


def _mount(where: Path, size_kib: int, read_only: bool = False) -> str | None:
    """A tmpfs of ``size_kib`` at ``where`` (remounted read-only when asked); None, or why not."""
    where.mkdir(parents=True, exist_ok=True)
    steps = [["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(where)]]
    if read_only:
        steps += [["mkdir", "-p", str(where / "ckpt")], ["mount", "-o", "remount,ro", str(where)]]
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            return f"{' '.join(cmd)}: {proc.stderr.strip()}"
    return None


def _prepare_copies(work: Path, ckpt: Path) -> dict[str, str]:
    """Rank 0: the damaged copies of ``ckpt`` (global_step1, global_step2; latest = global_step2)."""
    from ds_twolevel.sharding.shard_manifest import ShardManifest

    names = {}
    shutil.copytree(ckpt, work / "mixed")
    for name in ("mp_rank_01_model_states.pt", "zero_pp_rank_0_mp_rank_01_optim_states.pt"):
        shutil.copy(ckpt / "global_step1" / name, work / "mixed" / "global_step2" / name)
    for case, edit, redigest in (("swapped", _swap_q, False), ("deleted", _delete_o, True),
                                 ("out_of_range", _out_of_range, True)):
        shutil.copytree(ckpt, work / case)
        names[case] = _edit_manifest(work / case / "global_step2" / "two_level.json", edit, redigest)
    shutil.copytree(ckpt, work / "newer")  # the older tag says it was saved last
    older = ShardManifest.read(work / "newer" / "global_step1")
    older.info["saved_at_ns"] = time.time_ns() + 10 ** 12
    (work / "newer" / "global_step1" / "two_level.json").write_text(older.to_json())
    shutil.copytree(ckpt, work / "truncated")
    manifest = work / "truncated" / "global_step1" / "two_level.json"
    manifest.write_text(manifest.read_text()[:300])
    return names


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _overhead(out: dict, engine, ckpt: Path) -> None:
    """Bytes of a tag, the time to save it, to hash it (what the save adds), to verify this rank's files
    (what a load adds) and to load it."""
    import ds_twolevel
    from ds_twolevel.deepspeed.checkpoint import files_read
    from ds_twolevel.deepspeed.integrity import file_record
    from ds_twolevel.sharding.shard_manifest import ShardManifest

    tag = ckpt / "global_step2"
    files = [p for p in tag.iterdir() if p.name != "two_level.json"]
    out["tag_bytes"] = sum(p.stat().st_size for p in files)
    out["hash_s"] = min(_timed(lambda: [file_record(p) for p in files]) for _ in range(3))
    saved = ShardManifest.read(tag)
    from ds_twolevel.deepspeed.integrity import verify_files
    out["verify_s"] = min(_timed(lambda: verify_files(tag, saved, files_read(engine, tag, saved, "native")))
                          for _ in range(3))
    out["load_s"] = _timed(lambda: ds_twolevel.load_checkpoint(engine, ckpt))
    out["manifest_bytes"] = (tag / "two_level.json").stat().st_size
    out["files_record_bytes"] = len(json.dumps(saved.info["files"]))


def rank_cases(work: str) -> dict:
    """Every multi-rank case on this rank; returns the messages and checks (see the module docstring)."""
    import resource

    import torch.distributed as dist

    import ds_twolevel
    from ds_twolevel.deepspeed.checkpoint import mesh_of
    from ds_twolevel.deepspeed.integrity import estimate_save_bytes

    work, rank, out = Path(work), dist.get_rank(), {}
    engine, ckpt = _engine(1, 2, seed=0), work / "ckpt"
    for step in (1, 2):
        _step(engine, step)
        out[f"save_s_{step}"] = _timed(lambda: ds_twolevel.save_checkpoint(engine, ckpt, client_state={"step": step}))
    state2 = ds_twolevel.dense_state_dict(engine)
    out["estimate"] = estimate_save_bytes(engine, mesh_of(engine).layout.tp_size)
    out["saved_bytes"] = sum(p.stat().st_size for p in (ckpt / "global_step2").iterdir())
    if rank == 0:
        out["names"] = _prepare_copies(work, ckpt)
    dist.barrier()
    resharding = _engine(1, 1, seed=3)  # dp2 x n1 x m1 over the same two ranks
    out["mixed_native"] = _attempt(lambda: engine.load_checkpoint(str(work / "mixed")))  # DeepSpeed's own load
    out["mixed_reshard"] = _attempt(lambda: ds_twolevel.load_checkpoint(resharding, work / "mixed"))
    for case in ("swapped", "deleted", "out_of_range"):
        out[case] = _attempt(lambda: ds_twolevel.load_checkpoint(engine, work / case))
    out["unchanged"] = _same(ds_twolevel.dense_state_dict(engine), state2)
    _step(engine, 3)  # away from step 2, so that a load of global_step2 shows
    for case in ("newer", "truncated"):
        _, client = ds_twolevel.load_checkpoint(engine, work / case)
        out[f"{case}_step"], out[f"{case}_state2"] = client["step"], _same(ds_twolevel.dense_state_dict(engine), state2)
    out["truncated_tag"] = _attempt(lambda: ds_twolevel.load_checkpoint(engine, work / "truncated", tag="global_step1"))
    _, client = ds_twolevel.load_checkpoint(resharding, ckpt)  # the intact checkpoint reshards
    out["reshard_ok"] = _same(ds_twolevel.dense_state_dict(resharding), state2)
    _overhead(out, engine, ckpt)
    _file_system_cases(out, engine, work, rank, state2)
    return out


def _file_system_cases(out: dict, engine, work: Path, rank: int, state2: dict) -> None:
    import resource

    import torch.distributed as dist

    import ds_twolevel

    mounted: list[Path] = []
    try:
        why = None
        if rank == 0:  # a tmpfs of half the save, and a read-only one
            why = _mount(work / "full", max(out["estimate"] // 2048, 64)) or _mount(work / "ro", 1024, read_only=True)
            mounted = [p for p in (work / "full", work / "ro") if os.path.ismount(p)]
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, why)
        out["mount"] = gathered[0]
        if gathered[0] is None:
            out["full"] = _attempt(lambda: ds_twolevel.save_checkpoint(engine, work / "full" / "ckpt", tag="global_step3"))
            out["full_left"] = sorted(os.listdir(work / "full" / "ckpt"))
            out["ro"] = _attempt(lambda: ds_twolevel.save_checkpoint(engine, work / "ro" / "ckpt", tag="global_step3"))
        # a file-size limit on rank 1 only, hit while DeepSpeed writes its files (EFBIG)
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)
        if rank == 1:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the rank
            resource.setrlimit(resource.RLIMIT_FSIZE, (4096, limit[1]))
        try:
            out["efbig"] = _attempt(lambda: ds_twolevel.save_checkpoint(engine, work / "efbig", tag="global_step9"))
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        dist.barrier()
        out["efbig_left"] = sorted(os.listdir(work / "efbig"))
        ds_twolevel.save_checkpoint(engine, work / "efbig", tag="global_step9")  # the next save succeeds
        out["efbig_after"] = sorted(os.listdir(work / "efbig" / "global_step9"))
    finally:
        dist.barrier()
        for path in mounted:
            subprocess.run(["umount", str(path)], check=False)


# -- pytest side ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    from ds_twolevel.testing import run_distributed

    work = tmp_path_factory.mktemp("integrity")
    results = run_distributed(rank_cases, 2, str(work), timeout=1200, pg_timeout=300)
    print("\n" + "\n".join(f"{k}: {v}" for k, v in results[0].items() if isinstance(v, str)))
    return work, results


def _both(results: list[dict], key: str) -> str:
    assert results[0][key] == results[1][key], (key, results[0][key], results[1][key])
    assert "\n" not in results[0][key], results[0][key]
    return results[0][key]


def test_file_of_another_tag_is_refused(cases):
    """tp-rank-1 files of global_step1 in global_step2: DeepSpeed's own load (same layout; only rank 1
    reads them) and a resharded load (both ranks read them) refuse on both ranks, naming the file."""
    work, results = cases
    native = _both(results, "mixed_native")
    assert native.startswith(f"loading checkpoint {work / 'mixed'} failed on rank 1: ValueError: "
                             f"global_step2/mp_rank_01_model_states.pt (tp rank 1): checksum differs from the manifest"), native
    assert "it is global_step1's file (same size and checksum)" in native, native
    reshard = _both(results, "mixed_reshard")
    assert reshard.startswith(f"loading checkpoint {work / 'mixed'} failed on rank 0, 1: ValueError: "
                              f"global_step2/mp_rank_01_model_states.pt (tp rank 1): checksum differs"), reshard
    assert results[0]["unchanged"] and results[1]["unchanged"]


def test_damaged_manifest_is_refused_naming_the_entry(cases):
    work, results = cases
    names = results[0]["names"]
    swapped = _both(results, "swapped")
    assert swapped == (f"loading checkpoint {work / 'swapped'} failed on rank 0, 1: ValueError: "
                       f"{work / 'swapped' / 'global_step2' / 'two_level.json'}: its content does not match its digest "
                       f"(entry {names['swapped']!r} differs from what dp=1 x n=1 x m=2 places): it was edited or "
                       f"damaged after the save; resume from another tag"), swapped
    deleted = _both(results, "deleted")
    assert "has no entry (an entry was deleted)" in deleted and "o_proj.weight" in deleted, deleted
    out_of_range = _both(results, "out_of_range")
    assert (f"entry {names['out_of_range']!r}, tp rank 1: run [1030, 1036) is out of range for dim"
            in out_of_range), out_of_range


def test_resume_without_tag_takes_latest(cases):
    """``latest`` names global_step2: an older tag with a newer saved_at_ns, or with a truncated
    two_level.json, changes nothing; asking for the truncated tag names it and its file."""
    work, results = cases
    for r in results:
        assert (r["newer_step"], r["newer_state2"], r["truncated_step"], r["truncated_state2"]) == (2, True, 2, True), r
        assert r["reshard_ok"], "the intact checkpoint resharded at dp2 x n1 x m1 differs"
    truncated = _both(results, "truncated_tag")
    assert truncated.startswith(f"loading checkpoint {work / 'truncated'} failed on rank 0, 1: ValueError: "
                                f"{work / 'truncated' / 'global_step1' / 'two_level.json'} is damaged (not valid "
                                f"JSON: "), truncated


def test_full_disk_and_read_only_are_one_line(cases):
    work, results = cases
    if results[0]["mount"] is not None:
        pytest.skip(f"tmpfs cannot be mounted here ({results[0]['mount']}); the file-size-limit case still ran")
    needed = results[0]["estimate"]
    full = _both(results, "full")
    assert full.startswith(f"saving {work / 'full' / 'ckpt' / 'global_step3'} failed on rank 0: OSError: no space "
                           f"left in {work / 'full' / 'ckpt'} (ENOSPC): the save needs about "), full
    assert f"({needed} bytes)" in full and "free space there or save elsewhere" in full, full
    assert results[0]["full_left"] == [], results[0]["full_left"]
    ro = _both(results, "ro")
    assert ro == (f"saving {work / 'ro' / 'ckpt' / 'global_step3'} failed on rank 0: OSError: {work / 'ro' / 'ckpt'} "
                  f"is on a read-only file system (EROFS): the save needs about "
                  f"{_human(needed)}; save elsewhere, or remount it read-write"), ro


def _human(n: int) -> str:
    from ds_twolevel.deepspeed.integrity import human

    return human(n)


def test_write_failure_on_one_rank_is_reported_on_every_rank(cases):
    """Rank 1 exceeds its file-size limit inside DeepSpeed's save: both ranks raise the same line
    after DeepSpeed's own barrier (no hang), the partial tag is removed, the next save succeeds."""
    work, results = cases
    efbig = _both(results, "efbig")
    assert efbig.startswith(f"saving {work / 'efbig' / 'global_step9'} failed on rank 1: OSError: a file in "
                            f"{work / 'efbig'} exceeds this process's file-size limit (EFBIG; the limit, ulimit -f, is 4096 "
                            f"bytes)"), efbig
    assert "the save needs about" in efbig
    assert not [n for n in results[0]["efbig_left"] if n.startswith("global_step9")], results[0]["efbig_left"]
    assert "two_level.json" in results[0]["efbig_after"]


def test_estimate_and_checksum_overhead(cases):
    """The bytes estimate against the files of a real save, and what checksums cost (printed)."""
    _, results = cases
    r = results[0]
    assert 0.8 <= r["saved_bytes"] / r["estimate"] <= 1.25, (r["saved_bytes"], r["estimate"])
    print(f"\ntiny Llama dp1 x n1 x m2 ZeRO-1: tag {r['tag_bytes']} bytes (estimate {r['estimate']}), manifest "
          f"{r['manifest_bytes']} bytes of which the file record {r['files_record_bytes']}; save "
          f"{r['save_s_2'] * 1e3:.0f} ms, hashing every file of the tag {r['hash_s'] * 1e3:.1f} ms; load "
          f"{r['load_s'] * 1e3:.0f} ms, verifying this rank's files {r['verify_s'] * 1e3:.1f} ms; crc32 "
          f"{_crc_speed() / 1e9:.2f} GB/s on one core")


def _crc_speed() -> float:
    import zlib

    data = os.urandom(32 << 20)
    return max(len(data) / _timed(lambda: zlib.crc32(data)) for _ in range(3))


# -- pure: the manifest checks -----------------------------------------------------------------------------
def _manifest():
    from tests.test_checkpoint_layout import patched_ranks
    from ds_twolevel.sharding.shard_manifest import manifest_for
    from hf_integration.testing import tiny_model

    return manifest_for(patched_ranks(tiny_model("llama"), 1, 2)[0], (1, 1, 2))


def test_manifest_checks_name_the_entry():
    from ds_twolevel.deepspeed.integrity import check_structure
    from ds_twolevel.sharding.shard_manifest import ShardManifest, digest_matches

    text = _manifest().to_json()
    assert digest_matches(text) is True
    manifest = ShardManifest.from_json(text)
    check_structure(manifest, "m.json")
    raw = json.loads(text)
    name = _swap_q(raw)
    with pytest.raises(ValueError, match="m.json: its content does not match its digest"):
        ShardManifest.from_json(json.dumps(raw), source="m.json")
    for edit, message in ((_delete_o, "has no entry (an entry was deleted)"),
                          (_out_of_range, "tp rank 1: run [1030, 1036) is out of range")):
        raw = json.loads(text)
        name = edit(raw)
        edited = ShardManifest.from_json(json.dumps(raw), check_digest=False)
        with pytest.raises(ValueError) as err:
            check_structure(edited, "m.json")
        assert message in str(err.value) and "o_proj" in str(err.value) and str(err.value).startswith("m.json: ")
    raw = json.loads(text)
    raw["info"].pop("digest")
    assert digest_matches(raw) is None  # written before manifests carried a digest: accepted
    with pytest.raises(ValueError, match=r"m.json is damaged \(not valid JSON: Unterminated string"):
        ShardManifest.from_json(text[:200], source="m.json")


def test_verify_file_names_what_differs(tmp_path):
    from ds_twolevel.deepspeed.integrity import file_record, verify_file

    tag = tmp_path / "global_step4"
    tag.mkdir()
    (tag / "zero_pp_rank_1_mp_rank_01_optim_states.pt").write_bytes(b"a" * 100)
    files = {"zero_pp_rank_1_mp_rank_01_optim_states.pt": file_record(tag / "zero_pp_rank_1_mp_rank_01_optim_states.pt")}
    verify_file(tag, "zero_pp_rank_1_mp_rank_01_optim_states.pt", files)
    (tag / "zero_pp_rank_1_mp_rank_01_optim_states.pt").write_bytes(b"a" * 99 + b"b")
    with pytest.raises(ValueError, match=r"global_step4/zero_pp_rank_1_mp_rank_01_optim_states.pt \(tp rank 1, dp rank "
                                         r"1\): checksum differs from the manifest \(crc32 [0-9a-f]{8}, recorded"):
        verify_file(tag, "zero_pp_rank_1_mp_rank_01_optim_states.pt", files)
    (tag / "zero_pp_rank_1_mp_rank_01_optim_states.pt").write_bytes(b"a" * 50)
    with pytest.raises(ValueError, match=r"\(tp rank 1, dp rank 1\): 50 bytes, the manifest records 100"):
        verify_file(tag, "zero_pp_rank_1_mp_rank_01_optim_states.pt", files)


def test_forbidden_directory_is_named():
    """EACCES: a user without write permission (a forked child as ``nobody``; root ignores modes)."""
    import tempfile

    from ds_twolevel.deepspeed.integrity import probe_writable, write_failure

    if os.getuid() != 0:
        pytest.skip("needs root to drop to another user")
    base = Path(tempfile.mkdtemp(prefix="ds_twolevel_eacces_"))  # under /tmp: searchable by every user
    target = base / "ckpt"
    try:
        target.mkdir()
        os.chmod(base, 0o755)
        os.chmod(target, 0o755)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: drop to nobody, try the probe a save makes
            message = "NOT REFUSED"
            try:
                os.setgid(65534)
                os.setuid(65534)
                probe_writable(target)
            except OSError as err:
                message = write_failure(err, target, 2048, None)
            except BaseException as err:  # noqa: BLE001 - reported to the parent
                message = f"CHILD FAILED: {err!r}"
            finally:
                os.write(write, message.encode())
                os._exit(0)
        os.close(write)
        os.waitpid(pid, 0)
        message = os.read(read, 4096).decode()
    finally:
        shutil.rmtree(base)
    assert message == (f"{target} is not writable by this user (EACCES): the save needs about 2.0 KiB (2048 bytes); "
                       f"give the user write permission there, or save elsewhere"), message
