"""Every command's options and their defaults: the one place command defaults live (those the
library shares, like MAX_LEN and SEED, come from toucan.defaults; the generation settings from
toucan.sampling).

Each command is a function taking one of these dataclasses (see COMMANDS in toucan.cli); the CLI
is generated from the fields: `--field-name` is the spelling help shows, `--field_name` and any
aliases also work (hidden), booleans get `--x/--no-x`, list fields take several values, `help=` is
what `toucan CMD --help` prints. Use `opt(default, "help", "--alias")` for a field;
`positional=True` makes it an argument.

One vocabulary in every command (tests/test_cli.py checks it): --model is the input model,
--output what the command writes, --data its data, --max-len a sequence length, --base the base
model an adapter or delta belongs to. Older names (HF Trainer's --model_name_or_path, --output_dir,
--data_path, --model_max_length; FastChat's --base-model-path ...) stay as hidden aliases.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from .defaults import GGUF_TYPES, MAX_LEN, SEED
from .prompts import DEFAULT_TEMPLATE, TEMPLATES
from .sampling import FIELDS as SAMPLING_FIELDS, OPENAI, SamplingParams


def opt(default: Any = None, help: str = "", *aliases: str, positional: bool = False,
        choices: list | tuple | None = None, required: bool = False, metavar: str | None = None):
    meta = {"help": help, "aliases": aliases, "positional": positional, "choices": choices,
            "required": required, "metavar": metavar}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


# The two safety switches (README "Security"): one help text each, the same in every command.
OVERWRITE_HELP = ("replace an existing output, but only one that toucan wrote (never an input, "
                  "the working directory or a folder without toucan's manifest)")
TRUST_REMOTE_CODE_HELP = ("run Python code from the model folder (auto_map in config.json or "
                          "tokenizer_config.json); without it such folders are refused")
# Every command that takes --model also takes a LoRA adapter directory (toucan.modeling.load_adapter).
BASE_HELP = ("base model directory for a LoRA adapter given as --model "
             "(default: the one recorded in its adapter_config.json)")


# ----------------------------------------------------------------------------------------------
# Generation settings shared by chat, web and eval: the engine's SamplingParams as flags, with its
# defaults (toucan.sampling says why they are what they are).

_SAMPLING = SamplingParams()


@dataclass
class GenerationOptions:
    max_new_tokens: int = opt(_SAMPLING.max_new_tokens, "most tokens to generate per reply", "--max-tokens")
    temperature: float = opt(_SAMPLING.temperature, "sampling temperature (0 = greedy)")
    top_p: float = opt(_SAMPLING.top_p, "nucleus sampling: keep the smallest token set with this much probability")
    top_k: int = opt(_SAMPLING.top_k, "sample among the k most likely tokens (0 = no limit)")
    repetition_penalty: float = opt(_SAMPLING.repetition_penalty, "penalise tokens already generated (1.0 = off)")
    num_beams: int = opt(_SAMPLING.num_beams, "beam search width (>1 disables sampling and streaming token by token)")
    do_sample: bool = opt(_SAMPLING.do_sample, "sample (True) or decode greedily (False)")
    seed: Optional[int] = opt(_SAMPLING.seed, "random seed for sampling (None = nondeterministic)")
    stop: list[str] = opt(_SAMPLING.stop, "stop strings: generation ends before any of them (not printed)")
    min_new_tokens: int = opt(_SAMPLING.min_new_tokens, "generate at least this many tokens (EOS is suppressed until then)")

    def sampling_params(self, **overrides) -> SamplingParams:
        """These options as the engine's SamplingParams (chat, web's defaults, eval generate)."""
        return SamplingParams(**{**{k: getattr(self, k) for k in SAMPLING_FIELDS}, **overrides})


@dataclass
class ModelOptions:
    template: str = opt(DEFAULT_TEMPLATE, "prompt template", choices=sorted(TEMPLATES))
    device: str = opt("auto", "cpu, cuda, cuda:N, or auto")
    dtype: str = opt("auto", "auto (fp32 on CPU, bf16/fp16 on GPU), float32, bfloat16, float16",
                     choices=["auto", "float32", "bfloat16", "float16"])
    trust_remote_code: bool = opt(False, TRUST_REMOTE_CODE_HELP)
    threads: int = opt(0, "CPU threads for generation (0 = llama.cpp: the physical cores; transformers: torch's default)")
    n_ctx: int = opt(0, "context length in tokens (0 = the model's: config.json max_position_embeddings, "
                        "or the .gguf's context length); longer conversations drop their oldest turns")

    def engine_options(self) -> dict:
        """Engine.from_dir's keyword arguments for these options and the command's --base:
        Engine.from_dir(cfg.model, **cfg.engine_options()) (chat, web, serve, eval generate)."""
        return dict(device=self.device, dtype=self.dtype, template=self.template, max_context=self.n_ctx or None,
                    threads=self.threads, trust_remote_code=self.trust_remote_code, base=getattr(self, "base", None))


# ----------------------------------------------------------------------------------------------
# toucan data

@dataclass
class DataConfig:
    """Load, validate, sample, deduplicate and tokenize Alpaca-format instruction data."""

    data: list[str] = opt([], "JSON array or JSON Lines files; FILE:0.5 keeps a fraction, FILE:1000 a count",
                          positional=True, metavar="FILE[:N]")
    tokenizer: Optional[str] = opt(None, "tokenizer directory or SentencePiece .model (needed for token counts)")
    template: str = opt(DEFAULT_TEMPLATE, "prompt template", choices=sorted(TEMPLATES))
    max_len: int = opt(MAX_LEN, "maximum tokens per example (prompt + response + EOS)", "--model_max_length",
                       "--model-max-length")
    min_response_tokens: int = opt(1, "drop examples whose response has fewer tokens")
    seed: int = opt(SEED, "seed for sampling and shuffling")
    shuffle: bool = opt(True, "shuffle records (seeded)")
    dedup: bool = opt(True, "drop records whose (instruction, input, output) repeats")
    drop_too_long: bool = opt(False, "drop over-long examples instead of truncating their response")
    skip_bad: bool = opt(False, "skip malformed records (reported with file and line) instead of failing")
    stats: bool = opt(False, "print a report: records, token-length percentiles, how many get truncated")
    output: Optional[str] = opt(None, "write the cleaned records as JSON Lines here")
    overwrite: bool = opt(False, OVERWRITE_HELP)
    trust_remote_code: bool = opt(False, TRUST_REMOTE_CODE_HELP)


# ----------------------------------------------------------------------------------------------
# toucan train  (the original's HF Trainer names, --model_name_or_path ..., are aliases)

@dataclass
class TrainConfig:
    """Supervised fine-tuning (full or LoRA) with the HF Trainer; also under torchrun / DeepSpeed / FSDP."""

    model: str = opt(None, "model directory to fine-tune", "--model_name_or_path", "--model-name-or-path",
                     required=True)
    data: list[str] = opt([], "training data (same syntax as `toucan data`)", "--data_path", "--data-path",
                          required=True)
    output: str = opt(None, "where the fine-tuned model (or LoRA adapter) goes; checkpoints go to OUTPUT-checkpoints/",
                      "--output_dir", "--output-dir", required=True)
    tokenizer: Optional[str] = opt(None, "tokenizer directory (default: the model's); embeddings are resized to it")
    template: str = opt(DEFAULT_TEMPLATE, "prompt template", choices=sorted(TEMPLATES))
    max_len: int = opt(MAX_LEN, "maximum tokens per example", "--model_max_length", "--model-max-length")
    finetuning_type: str = opt("full", "full or lora", choices=["full", "lora"])
    lora_rank: int = opt(8, "LoRA rank")
    lora_alpha: float = opt(16.0, "LoRA alpha")
    lora_dropout: float = opt(0.05, "LoRA dropout")
    lora_target: list[str] = opt(["q_proj", "v_proj"], "modules LoRA adapts (or 'all-linear')")
    lora_train_embeddings: bool = opt(False, "also train embed_tokens and lm_head (for an extended vocabulary)")
    packing: bool = opt(False, "pack examples into full rows (no cross-example attention; LM head only on response tokens)")
    num_train_epochs: float = opt(3.0, "epochs")
    max_steps: int = opt(-1, "stop after this many optimizer steps (-1 = by epochs)")
    per_device_train_batch_size: int = opt(2, "batch size per device")
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step")
    learning_rate: float = opt(2e-5, "peak learning rate")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    warmup_ratio: float = opt(0.03, "fraction of steps for linear warm-up")
    lr_scheduler_type: str = opt("cosine", "learning-rate schedule")
    logging_steps: int = opt(10, "log every N steps")
    save_steps: int = opt(500, "checkpoint every N steps")
    save_total_limit: Optional[int] = opt(2, "keep at most N checkpoints")
    seed: int = opt(SEED, "seed for init, data order and dropout")
    bf16: bool = opt(False, "bfloat16 mixed precision (GPU)")
    fp16: bool = opt(False, "float16 mixed precision (GPU)")
    tf32: Optional[bool] = opt(None, "allow TF32 matmuls (Ampere+ GPUs)")
    gradient_checkpointing: bool = opt(False, "trade compute for memory")
    deepspeed: Optional[str] = opt(None, "DeepSpeed config: a JSON file or a shipped name (zero2, zero3, zero3_offload, ...)")
    fsdp: bool = opt(False, "shard with FSDP (torch FSDP2; also works on CPU with gloo)")
    resume_from_checkpoint: Optional[str] = opt(None, "checkpoint directory, or 'auto' for the latest complete one in OUTPUT-checkpoints/")
    skip_bad: bool = opt(False, "skip malformed data records instead of failing")
    report_to: str = opt("none", "where the Trainer reports (none, tensorboard, wandb)")
    overwrite: bool = opt(False, OVERWRITE_HELP)
    trust_remote_code: bool = opt(False, TRUST_REMOTE_CODE_HELP)
    extra_args: list[str] = opt([], "further HF TrainingArguments flags, passed through")


@dataclass
class MergeLoraConfig:
    """Merge a LoRA adapter into its base model, writing a full model directory."""

    model: str = opt(None, "LoRA adapter directory (a `toucan train --finetuning-type lora` output)", "--adapter",
                     required=True)
    base: Optional[str] = opt(None, "base model directory the adapter was trained on "
                                    "(default: the one recorded in its adapter_config.json)")
    output: str = opt(None, "where the merged model directory goes", "--output_dir", "--output-dir", required=True)
    overwrite: bool = opt(False, OVERWRITE_HELP)
    trust_remote_code: bool = opt(False, TRUST_REMOTE_CODE_HELP)


# ----------------------------------------------------------------------------------------------
# toucan chat

@dataclass
class ChatConfig(GenerationOptions, ModelOptions):
    """Chat with a model in the terminal (streaming, multi-turn)."""

    model: str = opt(None, "model directory (full precision or 4-bit), a LoRA adapter directory, or a .gguf file "
                           "(runs on llama.cpp)", required=True)
    base: Optional[str] = opt(None, BASE_HELP)
    plain: bool = opt(False, "non-interactive: read the prompt from stdin, write the answer to stdout")


# ----------------------------------------------------------------------------------------------
# toucan web  (the original demo's sliders; defaults from GenerationOptions)

@dataclass
class WebConfig(GenerationOptions, ModelOptions):
    """Gradio chat page: streaming, multi-turn, sliders, regenerate/stop/clear (binds 127.0.0.1)."""

    model: str = opt(None, "model directory (full precision or 4-bit), a LoRA adapter directory, or a .gguf file "
                           "(runs on llama.cpp)", required=True)
    base: Optional[str] = opt(None, BASE_HELP)
    host: str = opt("127.0.0.1", "address to bind; anything but loopback needs --auth or --insecure")
    port: int = opt(7860, "port")
    auth: Optional[str] = opt(None, "user:pass, or a file with one user:pass per line (also TOUCAN_WEB_AUTH: "
                                    "user:pass lines, so passwords need not show in ps)")
    insecure: bool = opt(False, "allow a non-loopback --host without --auth (anyone on the network can use it)")
    concurrency: int = opt(4, "chat requests Gradio runs at once (decoded together: continuous batching)")
    login_attempts: int = opt(5, "failed logins from one client address before it is locked out")
    login_lockout: float = opt(60.0, "seconds a client is refused (429) after too many failed logins")


# ----------------------------------------------------------------------------------------------
# toucan serve  (OpenAI-compatible; request fields override these defaults, which are OpenAI's)

@dataclass
class ServeConfig(ModelOptions):
    """OpenAI-compatible API server (FastAPI + uvicorn): /v1/models, /v1/chat/completions, /v1/completions."""

    model: str = opt(None, "model directory (full precision or 4-bit), a LoRA adapter directory, or a .gguf file "
                           "(runs on llama.cpp)", required=True)
    base: Optional[str] = opt(None, BASE_HELP)
    host: str = opt("127.0.0.1", "address to bind")
    port: int = opt(8000, "port")
    api_key: list[str] = opt([], "accepted API keys (also TOUCAN_API_KEYS, comma-separated); none = no auth")
    api_key_file: Optional[str] = opt(None, "file with accepted API keys, one per line (keeps them out of ps)")
    insecure: bool = opt(False, "allow a non-loopback --host without any API key (anyone on the network can use it)")
    allowed_hosts: list[str] = opt([], "Host header values accepted besides localhost/127.0.0.1/[::1] with the port "
                                       "(DNS-rebinding defence; '*' accepts any)")
    max_request_bytes: int = opt(1 << 20, "largest request body; bigger ones get 413 before they are read")
    max_tokens_limit: int = opt(0, "most tokens one request may generate (a larger max_tokens is lowered; 0 = no limit)")
    model_name: Optional[str] = opt(None, "model id reported by /v1/models (default: the directory name)")
    max_tokens: int = opt(_SAMPLING.max_new_tokens, "default max_tokens when a request gives none")
    repetition_penalty: float = opt(OPENAI.repetition_penalty,
                                    "default repetition penalty (a request may send repetition_penalty)")
    max_batch_size: int = opt(16, "most requests decoded together (continuous: rows in the running batch)")
    batching: str = opt("continuous", "continuous: a request joins the running batch at its next decode step and "
                                      "leaves when done (the model runs in a child process); static: waiting "
                                      "requests form a batch that runs to its end, in the server's process "
                                      "(a .gguf is always queued)", choices=["continuous", "static"])
    batch_wait_ms: float = opt(20.0, "static batching: how long the batcher waits for more requests before starting "
                                     "a batch (about one CPU decode step: costs little time to first token)")


# ----------------------------------------------------------------------------------------------
# toucan demo

@dataclass
class DemoConfig:
    """The whole recipe at toy scale, offline on a CPU: data -> SFT -> ... -> chat transcript."""

    output: str = opt("runs/demo", "run folder (everything the demo makes goes here)", "--output_dir",
                      "--output-dir")
    seed: int = opt(0, "seed for data, model and training")
    train_examples: int = opt(6000, "generated training questions")
    eval_examples: int = opt(200, "held-out generated questions for exact-match accuracy")
    families: list[str] = opt(["parity", "div5", "count"],
                              "task families (parity, div5, count, greater, digits, compare, repeat, reverse, add)")
    max_steps: int = opt(800, "SFT optimizer steps")
    batch_size: int = opt(32, "SFT examples per step")
    learning_rate: float = opt(3e-3, "SFT peak learning rate (tiny random models want a high one)")
    hidden_size: int = opt(128, "tiny LLaMA width (heads = width / 32)")
    num_layers: int = opt(2, "tiny LLaMA layers")
    vocab_size: int = opt(512, "demo SentencePiece vocabulary (trained on the generated data)")
    max_len: int = opt(64, "tokens per training example")
    template: str = opt(DEFAULT_TEMPLATE, "prompt template", choices=sorted(TEMPLATES))
    full_recipe: bool = opt(True, "after SFT also: delta round trip, 4-bit GPTQ, eval generate/judge/report")
    quant_group_size: int = opt(32, "GPTQ group size for the 4-bit model")
    threads: int = opt(0, "torch threads (0 = auto: all cores, fewer when the machine is busy)")


# ----------------------------------------------------------------------------------------------
# toucan eval generate | judge | report  (BELLE's judge method; see toucan/eval/)

@dataclass
class EvalGenerateConfig(GenerationOptions, ModelOptions):
    """Answer every eval-set question with a local model (batched) or an OpenAI-compatible server
    (--api-url, concurrent requests); resumable."""

    # Exactly one of --model (a local model) or --api-url (a server) is given: checked in commands/eval_generate.py.
    model: Optional[str] = opt(None, "model directory (full precision or 4-bit), a LoRA adapter directory, or a .gguf file "
                                     "(runs on llama.cpp); not with --api-url")
    api_url: Optional[str] = opt(None, "evaluate an OpenAI-compatible server instead (toucan serve, vLLM, llama.cpp, a "
                                       "hosted API): its base URL, e.g. http://127.0.0.1:8000/v1")
    served_model: Optional[str] = opt(None, "with --api-url: the served model's name (default: the server's only "
                                            "model in /v1/models)")
    api_key: Optional[str] = opt(None, "with --api-url: the server's API key (visible in `ps`; prefer --api-key-env)")
    api_key_env: str = opt("OPENAI_API_KEY", "with --api-url: environment variable holding the server's API key "
                                             "(none set: no key is sent)")
    chat: bool = opt(False, "with --api-url: ask through /v1/chat/completions (the server builds the prompt) instead "
                            "of sending toucan's exact prompt to /v1/completions")
    concurrency: int = opt(8, "with --api-url: requests in flight at once")
    timeout: float = opt(600.0, "with --api-url: seconds before one request times out")
    retries: int = opt(2, "with --api-url: retries per request on 429, 5xx, timeouts and connection errors")
    base: Optional[str] = opt(None, BASE_HELP)
    data: str = opt(None, "BELLE eval set: JSON Lines (or array) of {question, class, std_answer}",
                    "--eval-set", "--eval_set", required=True)
    output: str = opt(None, "answers file (JSON Lines); an existing one is resumed", required=True)
    overwrite: bool = opt(False, "start an existing answers file of other settings over (never an input)")
    model_name: Optional[str] = opt(None, "name shown in the report (default: the model directory's name)")
    batch_size: int = opt(8, "questions per generate call")
    limit: Optional[int] = opt(None, "answer only the first N questions (quick runs)")
    # Evaluation defaults to greedy decoding so a rerun gives the same answers (the shared
    # sampling defaults are for chatting).
    do_sample: bool = opt(False, "sample (True) or decode greedily (False)")


@dataclass
class EvalJudgeConfig:
    """Score answers with BELLE's judge prompts on any OpenAI-compatible endpoint (cached), or offline."""

    data: str = opt(None, "answers file written by `toucan eval generate`", "--answers", required=True)
    output: str = opt(None, "scores file (JSON Lines)", required=True)
    overwrite: bool = opt(False, OVERWRITE_HELP)
    prompts: Optional[str] = opt(None, "BELLE eval_prompt.json (judge prompt per class; needed by the LLM judge)")
    judge: str = opt("llm", "llm: an OpenAI-compatible judge; reference: offline character ROUGE-L "
                            "against std_answer (NOT comparable with LLM-judge scores)", choices=["llm", "reference"])
    judge_url: Optional[str] = opt(None, "OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 "
                                         "(default: the openai client's, i.e. $OPENAI_BASE_URL or OpenAI)")
    judge_model: str = opt("gpt-3.5-turbo", "judge model name (BELLE used gpt-3.5-turbo)")
    api_key_env: str = opt("OPENAI_API_KEY", "environment variable holding the judge's API key")
    temperature: float = opt(0.0, "judge sampling temperature (BELLE: 0)")
    max_tokens: Optional[int] = opt(None, "cap on each judge reply's tokens (default: the endpoint's)")
    concurrency: int = opt(8, "judge requests in flight at once")
    retries: int = opt(6, "retries per request on 429, 5xx, timeouts, connection errors and malformed replies "
                          "(exponential backoff)")
    timeout: float = opt(120.0, "seconds before one judge request times out (then retried)")
    max_consecutive_failures: int = opt(5, "stop the run (writing the scores so far, exit non-zero) after this "
                                           "many judge requests in a row fail after their retries; 0: never")
    out_of_range: str = opt("reject", "a parsed score outside 0..1: reject (counted as a parse failure) or clamp",
                            choices=["reject", "clamp"])
    cache: Optional[str] = opt(None, "judge cache (JSON Lines) keyed by (judge model, message); "
                                     "default: judge_cache.jsonl beside --output, shared by the models judged there")


@dataclass
class EvalReportConfig:
    """The score table (Markdown, CSV, JSON) and a bar chart from one or more scores files."""

    scores: list[str] = opt([], "scores files written by `toucan eval judge` (one per model)",
                            positional=True, required=True, metavar="SCORES")
    output: str = opt(None, "report directory (written atomically)", required=True)
    overwrite: bool = opt(False, OVERWRITE_HELP)


# ----------------------------------------------------------------------------------------------
# toucan tokenizer extend  (Chinese-LLaMA's vocabulary merge; see toucan/tokenizer.py)

@dataclass
class TokenizerExtendConfig:
    """Merge SentencePiece models the Chinese-LLaMA way and write a transformers tokenizer directory."""

    base: str = opt(None, "base SentencePiece .model (e.g. LLaMA's tokenizer.model)", required=True)
    add: str = opt(None, "SentencePiece .model whose missing pieces are appended (score 0, in its order)",
                   required=True)
    output: str = opt(None, "tokenizer directory to write (atomically)", required=True)
    overwrite: bool = opt(False, OVERWRITE_HELP)


# ----------------------------------------------------------------------------------------------
# toucan make-delta | apply-delta | check-delta  (streamed, bit-exact; see toucan/delta.py)

# --base/--model/--delta/--output in the one vocabulary; FastChat's --base-model-path,
# --target-model-path, --delta-path and our older --target/--delta for outputs are aliases.

@dataclass
class DeltaBase:
    base: str = opt(None, "base model directory (safetensors or pytorch_model*.bin)", "--base-model-path",
                    "--base_model_path", required=True)


@dataclass
class MakeDeltaConfig(DeltaBase):
    """Delta weights (fine-tuned - base, bit-exact, with checksums), streamed tensor by tensor."""

    model: str = opt(None, "fine-tuned model directory", "--target", "--target-model-path",
                     "--target_model_path", required=True)
    output: str = opt(None, "delta directory to write (atomically)", "--delta", "--delta-path", "--delta_path",
                      required=True)
    max_shard_size: str = opt("2GB", "largest delta shard file (e.g. 500MB, 2GB)")
    overwrite: bool = opt(False, OVERWRITE_HELP)


@dataclass
class ApplyDeltaConfig(DeltaBase):
    """Restore a fine-tuned model from base + delta; refuses a wrong base, verifies the result."""

    delta: str = opt(None, "delta directory written by make-delta", "--delta-path", "--delta_path", required=True)
    output: str = opt(None, "model directory to write (atomically)", "--target", "--target-model-path",
                      "--target_model_path", required=True)
    verify_sha256: bool = opt(False, "check base and result with the recorded sha256 instead of the "
                                     "xxh3-128 beside it (same detection, several times slower)")
    overwrite: bool = opt(False, OVERWRITE_HELP)


@dataclass
class CheckDeltaConfig(DeltaBase):
    """Report per tensor whether a base (and optionally a fine-tuned model) match a delta's checksums."""

    delta: str = opt(None, "delta directory written by make-delta", "--delta-path", "--delta_path", required=True)
    model: Optional[str] = opt(None, "restored or original fine-tuned model directory to check too",
                               "--target", "--target-model-path", "--target_model_path")


# ----------------------------------------------------------------------------------------------
# toucan quantize | ppl  (GPTQModel; see toucan/quant/ and toucan/ppl.py)

@dataclass
class QuantizeConfig:
    """Quantize a model to 2/3/4/8 bits (GPTQ or RTN) in the standard GPTQ checkpoint format."""

    model: str = opt(None, "full-precision model directory, or a LoRA adapter directory (merged into its "
                           "base first, in memory)", required=True)
    base: Optional[str] = opt(None, BASE_HELP)
    output: str = opt(None, "quantized model directory to write (atomically)", required=True)
    method: str = opt("gptq", "gptq (calibrated, error-compensating) or rtn (round to nearest)",
                      choices=["gptq", "rtn"])
    bits: int = opt(4, "bits per weight: 2, 3, 4 or 8")
    group_size: int = opt(128, "weights per scale/zero group along the input dim (-1 = per output channel)")
    # asymmetric + act-order + GPTAQ: the best KL to fp32 of the bench/quant.py --sweep candidates on
    # all six models, at g32 and g128 (bench/RESULTS.md "GPTQ defaults sweep", issue 16)
    desc_act: Optional[bool] = opt(None, "act-order: quantize columns by decreasing activation size, with static "
                                         "groups so the kernels stay fast (GPTQ only); default: on, off for a "
                                         "pruned model (--keep-sparsity needs natural column order)")
    sym: bool = opt(False, "symmetric quantization (zero point fixed at the middle; what GGUF Q4_0 can take "
                           "over exactly); off: asymmetric, a zero point per group")
    asym: bool = opt(False, "asymmetric quantization (a zero point per group; the default); overrides --sym")
    data: Optional[str] = opt(None, "calibration data: instruction JSON/JSONL (rendered with the prompt "
                                    "template) or plain .txt (required for gptq)", "--calib-data", "--calib_data")
    calib_samples: int = opt(128, "calibration sequences (GPTQ authors advise >= 128)")
    max_len: int = opt(MAX_LEN, "tokens per calibration sequence", "--calib-max-len", "--calib_max_len")
    template: str = opt(DEFAULT_TEMPLATE, "prompt template for instruction calibration data",
                        choices=sorted(TEMPLATES))
    damp_percent: float = opt(0.05, "GPTQ Hessian dampening, as a fraction of its mean diagonal")
    mse: float = opt(0.0, "GPTQ scale search: per group, shrink the range and keep the scale with the least "
                          "sum |error|^MSE (2.4 in the GPTQ authors' code); 0 = plain min/max")
    gptaq: Optional[bool] = opt(None, "GPTAQ (GPTQ v2): also correct the error that quantized earlier layers "
                                      "leave in each layer's inputs (GPTQModel cannot resume such a run: "
                                      "--no-gptaq for a resumable one); default: on, off for a pruned model")
    seed: int = opt(0, "seed for picking calibration samples")
    device: str = opt("auto", "device that runs the quantization: cpu, cuda, cuda:N, or auto")
    keep_sparsity: Optional[bool] = opt(None, "keep every zero weight zero (mask-aware GPTQ, natural column "
                                              "order); default: on for a model made by `toucan prune`")
    overwrite: bool = opt(False, OVERWRITE_HELP)
    trust_remote_code: bool = opt(False, TRUST_REMOTE_CODE_HELP)


@dataclass
class PplConfig:
    """Perplexity on plain text or on instruction responses; with --reference, also KL(reference || model)."""

    model: str = opt(None, "model directory (full precision or quantized), or a LoRA adapter directory", required=True)
    base: Optional[str] = opt(None, BASE_HELP)
    data: str = opt(None, "plain .txt, or instruction JSON/JSONL (only response tokens are scored)",
                    required=True)
    reference: Optional[str] = opt(None, "reference model directory for the mean per-token KL(reference || model)")
    max_len: int = opt(MAX_LEN, "tokens per window (plain text), or maximum tokens per example (instruction data)",
                       "--ctx")
    stride: int = opt(MAX_LEN, "plain text: a window starts every STRIDE tokens; each token is scored once")
    max_samples: int = opt(0, "score at most this many windows/examples (0 = all)")
    template: str = opt(DEFAULT_TEMPLATE, "prompt template for instruction data", choices=sorted(TEMPLATES))
    device: str = opt("auto", "cpu, cuda, cuda:N, or auto")
    output: Optional[str] = opt(None, "also write the result as JSON here")
    overwrite: bool = opt(False, OVERWRITE_HELP)
    trust_remote_code: bool = opt(False, TRUST_REMOTE_CODE_HELP)


# ----------------------------------------------------------------------------------------------
# toucan prune  (see toucan/prune.py)

@dataclass
class PruneConfig:
    """Prune a model's decoder layers (magnitude, Wanda, SparseGPT; unstructured or N:M), zeros stored."""

    model: str = opt(None, "full-precision model directory", required=True)
    output: str = opt(None, "pruned model directory to write (atomically)", required=True)
    method: str = opt("wanda", "magnitude (|W|, no data), wanda (|W| x input norm, per output row) or "
                               "sparsegpt (Hessian-based mask and weight update)",
                      choices=["magnitude", "wanda", "sparsegpt"])
    sparsity: Optional[float] = opt(None, "fraction of each layer's weights to zero, in (0, 1); "
                                          "0.5 when neither this nor --pattern is given")
    pattern: Optional[str] = opt(None, "N:M semi-structured: at most N non-zero of every M consecutive "
                                       "input weights (2:4 is what GPU sparse kernels run)", metavar="N:M")
    data: Optional[str] = opt(None, "calibration data: instruction JSON/JSONL (rendered with the prompt "
                                    "template) or plain .txt (needed by wanda and sparsegpt)")
    calib_samples: int = opt(128, "calibration sequences (both papers use 128)")
    max_len: int = opt(MAX_LEN, "tokens per calibration sequence")
    template: str = opt(DEFAULT_TEMPLATE, "prompt template for instruction calibration data",
                        choices=sorted(TEMPLATES))
    damp_percent: float = opt(0.01, "SparseGPT Hessian dampening, as a fraction of its mean diagonal")
    blocksize: int = opt(128, "SparseGPT columns per block (the mask of a block is chosen together)")
    seed: int = opt(0, "seed for picking calibration samples")
    device: str = opt("auto", "device that runs the pruning: cpu, cuda, cuda:N, or auto")
    dtype: str = opt("auto", "dtype the model runs in while pruning (statistics are fp32 regardless)",
                     choices=["auto", "float32", "bfloat16", "float16"])
    overwrite: bool = opt(False, OVERWRITE_HELP)
    trust_remote_code: bool = opt(False, TRUST_REMOTE_CODE_HELP)


# ----------------------------------------------------------------------------------------------
# toucan verify

# ----------------------------------------------------------------------------------------------
# toucan export gguf  (llama.cpp; see toucan/gguf_export.py)



@dataclass
class ExportGgufConfig:
    """Export a LLaMA model (full precision or toucan's GPTQ output) as one GGUF file for llama.cpp."""

    model: str = opt(None, "model directory: full precision, a GPTQ directory from toucan quantize, or a LoRA "
                           "adapter directory (merged into its base first)", required=True)
    base: Optional[str] = opt(None, BASE_HELP)
    output: str = opt(None, "FILE.gguf to write (atomically; FILE.gguf.toucan.json is written beside it)",
                      required=True)
    # No argparse `choices`: a wrong value gets the same one-line error from the CLI and a --config file.
    type: str = opt("f16", "tensor type: " + ", ".join(GGUF_TYPES) + " (a symmetric 4-bit GPTQ model whose "
                    "groups are multiples of 32, without act-order, becomes q4_0 exactly)")
    template: str = opt(DEFAULT_TEMPLATE, "prompt template written as tokenizer.chat_template", choices=sorted(TEMPLATES))
    threads: int = opt(0, "threads for llama.cpp's quantizer (q4_k_m; 0 = all cores)")
    overwrite: bool = opt(False, "replace an existing output that toucan export wrote")
    trust_remote_code: bool = opt(False, TRUST_REMOTE_CODE_HELP + " (only a LoRA adapter's base is loaded as a model)")


@dataclass
class VerifyConfig:
    """Check a directory against its toucan.json manifest (sha256 of every file)."""

    directory: str = opt(None, "directory written by toucan", positional=True)
