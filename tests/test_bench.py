"""The speed benchmark's measurements: decodes timed side by side, ratios paired block by block."""

import pytest
import torch

from mamba_slm import HybridLM, ModelConfig
from mamba_slm.bench import BenchArgs, decode_figures, interleaved_step_seconds, paired_ratio
from mamba_slm.generation import GREEDY_CHUNK, Engine


class LoggingEngine:
    """Stands in for an Engine: each prompt set's decode records its steps in a shared log."""

    device = torch.device("cpu")

    def __init__(self):
        self.log: list[str] = []
        self.closed: list[str] = []

    def _steps(self, prompts, config):
        name = prompts[0]
        try:
            for step in range(config.max_new_tokens):
                self.log.append(name)
                yield torch.tensor([step])
        finally:
            self.closed.append(name)


def test_blocks_of_the_sets_are_taken_in_turn_forward_then_backward():
    engine = LoggingEngine()
    seconds = interleaved_step_seconds(engine, [["a"], ["b"], ["c"]], blocks=3, steps=2)
    assert [len(s) for s in seconds] == [3, 3, 3] and all(t > 0 for s in seconds for t in s)
    # prefill and a first (untimed) block of every set come before any timed block
    assert engine.log[:9] == ["a"] * 3 + ["b"] * 3 + ["c"] * 3
    timed = engine.log[9:]
    assert timed == ["a", "a", "b", "b", "c", "c", "c", "c", "b", "b", "a", "a", "a", "a", "b", "b", "c", "c"]
    assert sorted(engine.closed) == ["a", "b", "c"]  # every decode is closed (its cache freed)


def test_decodes_are_closed_when_a_step_fails():
    class Failing(LoggingEngine):
        def _steps(self, prompts, config):
            if prompts[0] == "b":
                self.closed.append("b")
                raise RuntimeError("out of memory")
                yield
            yield from super()._steps(prompts, config)

    engine = Failing()
    with pytest.raises(RuntimeError, match="out of memory"):
        interleaved_step_seconds(engine, [["a"], ["b"]], blocks=2, steps=2)
    assert sorted(engine.closed) == ["a", "b"]


def test_paired_ratio_is_the_median_of_block_by_block_ratios():
    r = paired_ratio([2.0, 4.0, 6.0, 8.0, 10.0], [1.0] * 5)
    assert (r["median"], r["q1"], r["q3"], r["blocks"]) == (6.0, 4.0, 8.0, 5)
    # a machine that slows down 3x halfway through: each pair of blocks ran at the same moment
    assert paired_ratio([1.25, 1.25, 3.75, 3.75], [1.0, 1.0, 3.0, 3.0])["median"] == pytest.approx(1.25)
    assert paired_ratio([3.0], [2.0]) == {"median": 1.5, "q1": 1.5, "q3": 1.5, "blocks": 1}


def test_decode_figures_on_a_real_engine():
    torch.manual_seed(0)
    engine = Engine(HybridLM(ModelConfig.from_preset("tiny", vocab_size=256)).eval())
    args = BenchArgs(positions=(8, 40), batch_sizes=(1, 3), decode_blocks=4, block_steps=2)
    figures = decode_figures(engine, args)
    assert set(figures["latency_ms"]) == set(figures["latency_ratio"]) == {"8", "40"}
    assert set(figures["decode_tokens_per_s"]) == set(figures["throughput_ratio"]) == {"1", "3"}
    assert (
        figures["latency_ratio"]["8"]["median"] == 1.0 and figures["throughput_ratio"]["1"]["median"] == 1.0
    )
    assert figures["latency_ratio"]["40"]["blocks"] == 4 and figures["throughput_ratio"]["3"]["median"] > 0
    assert all(v > 0 for v in figures["latency_ms"].values())


def test_every_timed_block_of_greedy_decoding_is_one_call_of_the_c_steps(monkeypatch):
    torch.manual_seed(0)
    engine = Engine(HybridLM(ModelConfig.from_preset("tiny", vocab_size=256)).eval())
    calls, real = [], HybridLM.decode_greedy

    def logged(self, tokens, cache, steps, *args):
        calls.append((tokens.shape[0], steps))
        return real(self, tokens, cache, steps, *args)

    monkeypatch.setattr(HybridLM, "decode_greedy", logged)
    seconds = interleaved_step_seconds(engine, [[[1, 2, 3]], [[4, 5]] * 3], blocks=3, steps=GREEDY_CHUNK)
    assert [len(s) for s in seconds] == [3, 3]
    # a first untimed block per set, then one call per timed block, in the blocks' order
    one, three = (1, GREEDY_CHUNK), (3, GREEDY_CHUNK)
    assert calls == [one, three] + [one, three] + [three, one] + [one, three]
