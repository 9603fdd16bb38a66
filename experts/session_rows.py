"""A decode session keeps its row in vLLM's persistent batch from one chunk to the next (in-process engine).

A session is a resumable vLLM request: each chunk (the token the orchestrator chose) ends with one output, and
the next chunk re-enters the scheduler as a "new" request. vLLM's model runner (0.32) then takes the request out
of its persistent batch and adds it back (`GPUModelRunner._update_streaming_request`): every step it copies the
session's whole context into the batch's token array, rebuilds its block-table row and sampling state, and
refreshes the batch's sampling metadata. On the 2-core machine that was 9 % of an expert replica's samples at
concurrency 32, top-2 (py-spy; `InputBatch.add_request` alone 5 %), a cost that grows with the context.

Here a session that is still in the batch is updated where it sits: only the new tokens are written, plus its
token counts and block-table row. Anything else falls back to vLLM's own path: a session not in the batch
(it sat out a step), other sampling params, prompt embeddings, multimodal input, M-RoPE, async scheduling.
What the model sees is the same either way; tests/integration/test_inproc_engine.py checks the top-k against
the same sessions taking vLLM's path: bit for bit while the batch's rows keep their places, to float32 rounding
once a session sat out a step (the two paths then order the rows differently).

Installed by experts/inproc_engine.py in the replica's process, before the engine is built.
"""

from __future__ import annotations

from typing import Any

enabled = True              # False: vLLM's own path for every chunk (tests compare the two)
in_place_updates = 0        # sessions updated where they sit (this process), for tests and profiles


def install() -> None:
    """Patch vLLM's model runner (idempotent). The patched method keeps vLLM's signature and falls back to it."""
    from vllm.v1.worker.gpu_input_batch import InputBatch
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner, "_session_rows_installed", False):
        return
    original_update = GPUModelRunner._update_streaming_request
    original_add = InputBatch.add_request

    def _update_streaming_request(self: Any, req_id: str, new_req_data: Any) -> Any:
        state = self.requests[req_id]
        if enabled and update_in_place(self, state, new_req_data):
            kept = self.input_batch.__dict__.setdefault("_kept_in_place", set())
            kept.add(req_id)
            return state
        return original_update(self, req_id, new_req_data)

    def add_request(self: Any, request: Any) -> int:
        # _update_states adds back every request _update_streaming_request returned: not the one kept in place.
        kept = self.__dict__.get("_kept_in_place")
        if kept and request.req_id in kept:
            kept.discard(request.req_id)
            return self.req_id_to_index[request.req_id]
        return original_add(self, request)

    GPUModelRunner._update_streaming_request = _update_streaming_request
    InputBatch.add_request = add_request
    GPUModelRunner._session_rows_installed = True


def update_in_place(runner: Any, state: Any, new: Any) -> bool:
    """The next chunk of a session that is in the persistent batch, written where its row is. False (nothing
    touched) when vLLM's remove-and-add path is needed."""
    global in_place_updates
    batch = runner.input_batch
    index = batch.req_id_to_index.get(state.req_id)
    prompt = new.prompt_token_ids
    if (index is None or prompt is None or new.prompt_embeds is not None or new.mm_features
            or new.prompt_is_token_ids is not None or runner.uses_mrope or runner.use_async_scheduling
            or new.pooling_params is not None or new.sampling_params != state.sampling_params):
        return False
    start, end = int(batch.num_prompt_tokens[index]), len(prompt)
    if end < start or batch.req_output_token_ids[index] is not state.output_token_ids:
        return False
    # The row holds the old context (its last sampled token, never computed, is overwritten): append the rest.
    batch.token_ids_cpu[index, start:end] = prompt[start:]
    batch.is_token_ids[index, start:end] = True
    batch.num_prompt_tokens[index] = end
    batch.num_tokens_no_spec[index] = end
    batch.num_computed_tokens_cpu[index] = new.num_computed_tokens
    batch.block_table.add_row(new.block_ids, index)
    # The cached state, as vLLM's path leaves it.
    state.prompt_token_ids = prompt
    state.mm_features = new.mm_features
    state.block_ids = new.block_ids
    state.num_computed_tokens = new.num_computed_tokens
    state.num_prompt_tokens = end
    state.output_token_ids.clear()
    in_place_updates += 1
    return True
