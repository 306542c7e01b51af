"""Hugging Face integration: run a PreTrainedModel's attention and MLP on n x m ranks, exactly.

Stable entry points (other integrations, e.g. the DeepSpeed one, call these two; their
signatures do not change):

``patch_model(model, mesh, *, strict=True, strategy="cost_model", kv_replication=False) -> PatchReport``
    Partitions ``model`` in place on this rank (the object stays the same PreTrainedModel:
    forward, ``generate()``, ``save_pretrained`` keep working). ``mesh`` is a
    ``ds_twolevel.TwoLevelMesh`` (``TwoLevelLayout(n=, m=, dp=).build()``). Everything is
    validated before any module is touched or any collective issued: an unsupported
    architecture (strict) or a layout the model cannot take raises ValueError naming the model,
    the numbers and the layouts that fit. ``strict=False`` warns and leaves such modules dense.
    Patching sends no data and creates no process group: the sub-group that sums the gradients of
    replicated KV heads (``kv_replication``, n > KV heads) was built with the mesh and is only looked
    up (``TwoLevelMesh.axes_for``).

``save_dense_pretrained(model, save_directory, **save_pretrained_kwargs) -> Path``
    Collective over all ranks: gathers the shards layer by layer and writes (rank 0, temp dir then
    rename) a standard checkpoint that plain ``AutoModel*.from_pretrained`` loads. A patched
    model's ``save_pretrained`` calls it.

Also: ``load_partitioned(dir, mesh, ...)`` (each rank reads only its slices of a
``save_pretrained`` directory into a meta-device model), ``verify(model)`` (what was swapped,
per-rank parameter share), ``injection_policy(model, mesh)`` (HF class -> DeepSpeed-style
``replace_fn``), ``SPECS`` (one declarative ``ArchSpec`` per architecture), ``draft_spec(model, ...)`` (an
``ArchSpec`` drafted from the config's ``base_model_tp_plan``; docs/adding_an_architecture.md).

Example:
    >>> mesh = TwoLevelLayout(n=2, m=2).build()          # inside 4 ranks (torchrun, deepspeed, accelerate)
    >>> model = AutoModelForCausalLM.from_pretrained(path)
    >>> print(patch_model(model, mesh))
    >>> model.generate(ids, max_new_tokens=16)
"""
from hf_integration.checkpoint import dense_state_dict, load_partitioned, save_dense_pretrained
from hf_integration.policy import PatchReport, injection_policy, patch_model, verify
from hf_integration.specs import SPECS, ArchSpec, AttentionLayout, MLPLayout, MoELayout, supported_architectures
from hf_integration.tp_plan import draft_spec

__all__ = [
    "ArchSpec", "AttentionLayout", "MLPLayout", "MoELayout", "PatchReport", "SPECS", "dense_state_dict", "draft_spec",
    "injection_policy",
    "load_partitioned", "patch_model", "save_dense_pretrained", "supported_architectures", "verify",
]
