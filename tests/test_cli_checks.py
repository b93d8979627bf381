"""What a new user sees from the command line: bad arguments are named before any model loads or any GPU is
looked for, and the auto crossover is said in words when sparse attention never pays."""

import pytest

from prr.cli import main
from prr.model.auto import NEVER, describe_crossover


def test_crossover_is_a_number_of_tokens_or_never_in_words():
    assert describe_crossover(16384) == "crossover 16384 tokens on this device"
    never = describe_crossover(NEVER, 1)
    assert never == "sparse attention never pays on this device at batch 1: dense up to the model's window"
    assert str(NEVER) not in never and str(NEVER) not in describe_crossover(NEVER)


# (argv, a piece of the error it must print). Each would load SmolLM2 (or a preset) if the check came late.
MODEL_CASES = [
    (["generate", "--budget", "0", "--prompt", "hi"], "budget_tokens must be > 0, got 0"),
    (["generate", "--budget", "16", "--prompt", "hi"], "budget_tokens=16 leaves no dynamic block"),
    (["generate", "--dense-layers", "-1", "--prompt", "hi"], "--dense-layers must be >= 0, got -1"),
    (["generate", "--max-new-tokens", "0", "--prompt", "hi"], "--max-new-tokens must be >= 1, got 0"),
    (["generate", "--temperature", "-1", "--prompt", "hi"], "temperature"),
    (["generate", "--model", "llama-9", "--prompt", "hi"], "unknown model 'llama-9'"),
    (["demo", "--budget", "0"], "budget_tokens must be > 0, got 0"),
    (["demo", "--depth", "1.5"], "--depth must lie in [0, 1], got 1.5"),
    (["demo", "--tokens", "0"], "--tokens must be >= 1, got 0"),
    (["eval", "--budgets", "0"], "budget_tokens must be > 0, got 0"),
    (["eval", "--budgets", "1K"], "--budgets takes comma-separated token counts, got '1K'"),
    (["eval", "--tasks", "passkey,riddles"], "--tasks: unknown 'riddles'"),
    (["eval", "--methods", "quest,quest_m16c4,magic"], "--methods: unknown 'magic'"),
    (["eval", "--lengths", "4Q"], "cannot read '4Q' as a length"),
    (["eval", "--amortized", "16"], "cannot read '16' as an amortized setting"),
    (["eval", "--ppl-steps", "-1"], "--ppl-steps must be >= 0, got -1"),
    (["locality", "--k", "0"], "top_k must be > 0, got 0"),
    (["locality", "--steps", "0"], "--steps must be positive, got 0"),
    (["locality", "--amortized", "0x4"], "amortized setting '0x4'"),
]


@pytest.mark.parametrize(("argv", "error"), MODEL_CASES, ids=[" ".join(a) for a, _ in MODEL_CASES])
def test_bad_arguments_fail_before_the_model_loads(argv, error, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"prr {argv[0]}: error: " in err and error in err
    assert "loading" not in err  # _load announces the model before reading it: it must not have run


BENCH_CASES = [
    (["layer", "--contexts", "32K,12Q"], "cannot read '12Q' as a length (e.g. 4096, 4K or 1M)"),
    (["kernels", "--batches", "1,x"], "--batches takes comma-separated positive integers, got '1,x'"),
    (["kernels", "--budgets", "2048,-1"], "--budgets takes comma-separated positive integers, got '2048,-1'"),
    (["layer", "--models", "llama-3.1-8b,gpt-5"], "--models: unknown 'gpt-5'"),
    (["layer", "--methods", "quest,topk"], "--methods: unknown 'topk'"),
    (["select", "--amortized", "16"], "cannot read '16' as an amortized setting"),
    (["select", "--contexts", "0"], "--contexts must be positive lengths, got '0'"),
    (["e2e", "--contexts", "128K,1G"], "cannot read '1G' as a length"),
    (["e2e", "--attentions", "dense,sparse"], "--attentions: unknown 'sparse'"),
    (["e2e", "--model", "llama-9"], "unknown model 'llama-9'"),
    (["e2e", "--budget", "0"], "--budget must be positive, got 0"),
]


@pytest.mark.parametrize(("argv", "error"), BENCH_CASES, ids=[" ".join(a) for a, _ in BENCH_CASES])
def test_bench_arguments_are_named_before_the_gpu_is_looked_for(argv, error, capsys):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert f"prr bench {argv[0]}: error: " in err and error in err
    assert "needs a CUDA GPU" not in err
