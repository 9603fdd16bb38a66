"""ExpertConfig validation and translation to vLLM/Serve options; tokenizer fingerprint and the shared-tokenizer
check; the score-window plan. No engines."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from experts.config import GIB, ExpertConfig
from experts.protocol import ExpertInfo
from experts.scoring import plan_score_windows
from experts.tokenizer_check import TokenizerMismatchError, check_shared_tokenizer, tokenizer_fingerprint


def cfg(**kw) -> ExpertConfig:
    return ExpertConfig(**{"name": "code", "model_path": "/models/code", **kw})


def test_defaults_are_cpu_friendly():
    c = cfg()
    assert (c.num_replicas, c.num_gpus, c.tensor_parallel_size, c.dtype) == (1, 0, 1, "bfloat16")
    assert c.enforce_eager and c.max_top_k == 20


def test_engine_args_keep_the_session_contract():
    args = cfg(max_top_k=32, kv_cache_space_gib=2, engine_kwargs={"max_num_batched_tokens": 4096}).engine_args()
    assert args["skip_tokenizer_init"] is True
    assert args["logprobs_mode"] == "raw_logprobs"
    assert args["max_logprobs"] == 32
    assert args["enable_prefix_caching"] is True
    assert args["kv_cache_memory_bytes"] == 2 * GIB and "gpu_memory_utilization" not in args
    assert args["max_num_batched_tokens"] == 4096


def test_gpu_engine_args_use_memory_utilization():
    args = cfg(num_gpus=2, tensor_parallel_size=2, gpu_memory_utilization=0.8).engine_args()
    assert args["gpu_memory_utilization"] == 0.8 and "kv_cache_memory_bytes" not in args
    assert args["tensor_parallel_size"] == 2


def test_serve_options_put_runtime_env_in_ray_actor_options():
    opts = cfg(num_cpus=0.5, kv_cache_space_gib=3).serve_options()
    assert opts["name"] == "expert-code" and opts["num_replicas"] == 1
    actor = opts["ray_actor_options"]
    assert actor["num_cpus"] == 0.5 and actor["num_gpus"] == 0
    assert actor["runtime_env"] == {"env_vars": {"VLLM_CPU_KVCACHE_SPACE": "3", "VLLM_CPU_OMP_THREADS_BIND": "auto"}}
    assert "runtime_env" not in opts


def test_fractional_kv_space_goes_through_the_engine_argument_only():
    c = cfg(kv_cache_space_gib=0.25)
    assert c.engine_args()["kv_cache_memory_bytes"] == GIB // 4
    assert "VLLM_CPU_KVCACHE_SPACE" not in c.serve_options()["ray_actor_options"]["runtime_env"]["env_vars"]


def test_cpu_threads_bind_reaches_the_engine_environment():
    assert cfg(cpu_threads_bind="1").env_vars()["VLLM_CPU_OMP_THREADS_BIND"] == "1"
    assert "OMP_NUM_THREADS" not in cfg(cpu_threads_bind="1").env_vars()
    unpinned = cfg(cpu_threads_bind="nobind", cpu_threads=1).env_vars()      # a separate vLLM process: one thread
    assert unpinned["VLLM_CPU_OMP_THREADS_BIND"] == "nobind" and unpinned["OMP_NUM_THREADS"] == "1"
    assert cfg(num_gpus=1).env_vars() == {}


def test_config_round_trips_through_a_dict():
    c = cfg(engine_kwargs={"seed": 3})
    assert ExpertConfig(**c.model_dump()) == c


@pytest.mark.parametrize("field, value", [
    ("name", ""), ("name", "has space"), ("model_path", " "), ("num_replicas", 0), ("num_cpus", -1),
    ("num_gpus", -0.5), ("max_model_len", 0), ("max_model_len", 1), ("kv_cache_space_gib", 0),
    ("max_top_k", 0), ("session_idle_timeout_s", 0), ("max_num_seqs", 0), ("gpu_memory_utilization", 1.5), ("dtype", "int4"),
    ("engine_kwargs", {"skip_tokenizer_init": False}), ("cpu_threads_bind", "core0"), ("unknown_field", 1),
])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValidationError) as err:
        cfg(**{field: value})
    assert field in str(err.value)


def test_tensor_parallel_on_gpu_needs_enough_gpus():
    with pytest.raises(ValidationError, match="tensor_parallel_size=4 needs num_gpus >= 4"):
        cfg(num_gpus=2, tensor_parallel_size=4)


def test_session_capacity_reserves_slots_for_scoring():
    assert cfg(max_num_seqs=64).session_capacity() == 56
    assert cfg(max_num_seqs=2).session_capacity() == 1
    assert cfg(max_model_len=100).max_session_len == 99


# ---- tokenizer -----------------------------------------------------------------------------------------


def info(name: str, fingerprint: str, vocab_size: int = 4096) -> ExpertInfo:
    return ExpertInfo(name=name, model_path=f"/models/{name}", vocab_size=vocab_size, max_model_len=2048,
                      tokenizer_fingerprint=fingerprint, eos_token_id=0)


def test_shared_tokenizer_passes():
    assert check_shared_tokenizer([info("code", "abc"), info("math", "abc"), info("json", "abc")]) == "abc"


def test_tokenizer_mismatch_names_both_experts():
    with pytest.raises(TokenizerMismatchError) as err:
        check_shared_tokenizer([info("code", "abc"), info("prose", "abc"), info("math", "xyz")])
    assert "'code'" in str(err.value) and "'math'" in str(err.value) and "prose" not in str(err.value)


def test_vocab_size_mismatch_names_both_experts():
    with pytest.raises(TokenizerMismatchError, match="'code' and 'json'.*vocab_size 4096 vs 8192"):
        check_shared_tokenizer([info("code", "abc"), info("json", "abc", vocab_size=8192)])


def save_tokenizer(path, extra_special: str | None = None, corpus_words: int = 200) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>"] + ([extra_special] if extra_special else [])
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False)
    tok.train_from_iterator([f"word{i} and more text {i * 7}" for i in range(corpus_words)], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(str(path))
    return str(path)


def test_fingerprint_is_stable_and_sensitive(tmp_path):
    a = tokenizer_fingerprint(save_tokenizer(tmp_path / "a"))
    b = tokenizer_fingerprint(save_tokenizer(tmp_path / "b"))
    c = tokenizer_fingerprint(save_tokenizer(tmp_path / "c", extra_special="<|tool|>"))
    d = tokenizer_fingerprint(save_tokenizer(tmp_path / "d", corpus_words=150))
    assert a == b and len(a) == 64
    assert c != a and d != a


def test_fingerprint_of_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tokenizer_fingerprint(tmp_path / "nope")


# ---- score windows -------------------------------------------------------------------------------------


@pytest.mark.parametrize("length, window", [(1, 10), (5, 10), (10, 10), (11, 10), (25, 10), (100, 7), (3, 2)])
def test_score_windows_tile_every_prediction_once(length, window):
    rows: list[int] = []
    for start, keep_from in plan_score_windows(length, window):
        n_rows = min(window, length - start) - 1  # row i predicts token start + i + 1
        rows += [start + i for i in range(keep_from, n_rows)]
        assert keep_from == 0 or keep_from >= window // 2 - 1  # later rows keep at least half a window of context
    assert rows == list(range(length - 1))


def test_engine_process_auto_runs_the_engine_in_the_replica_on_cpu_and_separately_on_gpu():
    assert cfg().engine_inproc
    assert not cfg(num_gpus=1).engine_inproc
    assert not cfg(engine_process="separate").engine_inproc
    assert cfg(engine_process="inproc", num_gpus=1).engine_inproc
    with pytest.raises(ValidationError):
        cfg(engine_process="elsewhere")


def test_engine_cores_read_the_bind_spec():
    assert cfg(cpu_threads_bind="auto").engine_cores() is None
    assert cfg(cpu_threads_bind="nobind").engine_cores() is None
    assert cfg(cpu_threads_bind="1").engine_cores() == {1}
    assert cfg(cpu_threads_bind="0-3,6").engine_cores() == {0, 1, 2, 3, 6}


def test_data_plane_is_on_unless_serve_autoscales_the_expert():
    assert cfg().data_plane_on
    assert not cfg(autoscaling_config={"min_replicas": 1, "max_replicas": 2}).data_plane_on
    assert cfg(autoscaling_config={"min_replicas": 1, "max_replicas": 2}, data_plane="on").data_plane_on
    assert not cfg(data_plane="off").data_plane_on
    with pytest.raises(ValidationError):
        cfg(data_plane="sometimes")


def test_cpu_threads_must_be_positive():
    assert cfg(cpu_threads_bind="nobind", cpu_threads=1).cpu_threads == 1
    with pytest.raises(ValidationError):
        cfg(cpu_threads=0)
