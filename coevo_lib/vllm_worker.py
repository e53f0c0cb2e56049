"""Methods coevo mixes into vLLM's worker (``--worker-extension-cls``), called by name through /collective_rpc.

This module is imported inside the vLLM server, from .venv-vllm: it may import torch and vllm, nothing else
of coevo's dependencies (``coevo_lib/__init__.py`` imports nothing, so the package import is safe there).
"""

from __future__ import annotations

WORKER_EXTENSION = "coevo_lib.vllm_worker.WeightSwapExtension"


class WeightSwapExtension:
    """Loads a new full checkpoint into the running engine (same architecture), in place."""

    def coevo_reload_weights(self, weights_path: str) -> None:
        self.reload_weights(weights_path=weights_path)
        self._repack_output_head()

    def _repack_output_head(self) -> None:
        # vLLM 0.32's CPU GEMMs work on a packed copy of each weight, made when the weight is loaded. A head
        # tied to the embeddings (tie_word_embeddings: the tiny model, Qwen3-4B, Gemma) loads nothing of its
        # own on reload, so its packed copy kept the old embedding and greedy replies followed the old head
        # (measured). Packing again from the shared, updated weight fixes it; on GPU this packing is a no-op.
        from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

        for module in self.model_runner.get_model().modules():
            if isinstance(module, ParallelLMHead):
                module.quant_method.process_weights_after_loading(module)
