"""DeepSpeed integration (the integration layer; deepspeed itself is imported lazily, inside functions).

One job per module:

* ``runtime``: ``initialize`` / ``init_inference`` (engine creation), ``replica_rows``;
* ``rendezvous``: ``init_distributed``, ``build_mesh`` (config checked and agreed on every rank);
* ``inject``: the injection policy (``hf_integration.patch_model`` or ``policy=``);
* ``zero``: ``zero_init``, ``zero_init_model`` (HF weight init on gathered parameters), ``gathered``;
* ``faults``: ``fail_fast`` (a dead or stalled peer becomes one line and an exit);
* ``checkpoint``: atomic ``save_checkpoint`` / checked, resharding ``load_checkpoint``; with
  ``engine_state``, ``zero_files`` and ``convert`` (``ds-twolevel convert``);
* ``export``: ``dense_state_dict``, ``export_dense`` (a standard HF checkpoint);
* ``engine_hooks``: DeepSpeedEngine's save/load methods made right for two-level engines
  (``engine_patch``: DeepSpeed's own methods and the installer, for ``checkpoint`` below the hooks);
  ``import_hooks``: run code when a module gets imported;
* ``config`` / ``config_schema``: the ``"two_level"`` section and the DeepSpeed dict, validated (the
  DeepSpeed dict by DeepSpeed's own parser);
* ``env``: the CPU shm comm op's build and launch noise;
* ``compat``: every private-API workaround of DeepSpeed, transformers, accelerate, torch, version-commented.
"""
