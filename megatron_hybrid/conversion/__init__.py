"""Conversion: our trainer's checkpoints <-> Hugging Face ``olmo_hybrid`` directories, and the
comparison with transformers (tools/convert_to_hf.py, tools/convert_from_hf.py,
tools/compare_hf.py).

The floor above training/ and inference/ (docs/architecture.md): conversion orchestrates the
model (models/), our checkpoints (training/checkpoint.py) and generation (inference/), so it
imports them and nothing below imports it. The pure name/shape mapping between our parameters
and the HF keys stays with the model (``models/olmo_hybrid/hf_mapping.py``); everything here
reads or writes files.

Export (``hf_export.export_to_hf``): read ``run_config.json`` of an ``iter_N`` directory for the
model config, build a TP=1/PP=1 model in one process and load only its weights (megatron's dist
checkpointing reshards whatever TP/PP/VP layout saved them), map the unsharded state dict with
``hf_mapping.megatron_to_hf`` and write ``config.json``, ``generation_config.json``, sharded
``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json`` and the tokenizer. Then
(unless skipped) load the directory with ``transformers.AutoModelForCausalLM`` on CPU in fp32 and
compare its logits and greedy generation with ours (hf_compare's machinery, inference's decoder).

Import (``hf_import.import_from_hf``): read an HF directory (one or several safetensors files,
the released allenai/Olmo-Hybrid-7B layout or transformers' ``save_pretrained`` names), map it
with ``hf_mapping.hf_to_megatron`` into a TP=1 model and save a weights-only checkpoint
(``<save>/iter_0000000/`` + tracker + ``run_config.json``) that ``megatron-hybrid-train --load``
starts from with a fresh optimizer and schedule.

Every tensor is mapped exactly once; missing, unexpected or mis-shaped tensors and an
unsupported config raise ``ConversionError`` (or hf_mapping's ``KeyError``/``ValueError``/
``ConfigError``) naming the key, which the CLIs print as one ``error: ...`` line (exit 2).

Modules, lowest first:

- ``saved_checkpoints``: our checkpoints seen from the model side (``ConversionError``, config,
  resolving ``--load``, loading the weights into one TP=1/PP=1 model or a generation session);
- ``hf_files``: HF directories on disk (config.json, safetensors + index, on-disk names);
- ``hf_tokenizer``: the tokenizer of an export (sentencepiece copied/converted, or HF);
- ``hf_compare``: our model vs transformers' on the same weights (logits, gradients; the
  command line of tools/compare_hf.py);
- ``hf_export``: ``export_to_hf`` and its validation against transformers;
- ``hf_import``: ``import_from_hf``;
- ``cli``: the command lines of tools/convert_to_hf.py and tools/convert_from_hf.py.
"""
