"""Next-token choice and stop rules, tested directly as the pure functions they are."""

from __future__ import annotations

import torch

from worker.core.schema import GenParams
from worker.core.states import FinishReason
from worker.engine.sampling import choose_tokens, make_generator, result_text, stop_reason


def letters(ids: list[int]) -> str:
    """A decode function for the tests: token i is the letter 'a' + i; token 25 ('z') is EOS."""
    return "".join(chr(ord("a") + i) for i in ids if i != 25)


EOS = frozenset({25})


def test_greedy_rows_take_the_argmax() -> None:
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 1.0, 0.0]])
    assert choose_tokens(logits, [GenParams(), GenParams(temperature=0)], [None, None]) == [1, 0]
    assert make_generator(GenParams(temperature=0)) is None and make_generator(GenParams()) is None


def test_a_sampled_row_depends_only_on_its_own_seed() -> None:
    torch.manual_seed(0)
    row = torch.randn(50)
    params = GenParams(temperature=1.0, seed=7)

    def draw(neighbours: int) -> list[int]:
        logits = torch.stack([row, *torch.randn(neighbours, 50)])
        gens = [make_generator(params)] + [
            make_generator(GenParams(temperature=1.0)) for _ in range(neighbours)
        ]
        picks = []
        for _ in range(5):
            picks.append(choose_tokens(logits, [params] * (neighbours + 1), gens)[0])
        return picks

    assert draw(0) == draw(3) == draw(7)
    other = GenParams(temperature=1.0, seed=8)
    gen = make_generator(other)
    assert gen is not None
    assert [choose_tokens(row[None], [other], [gen])[0] for _ in range(5)] != draw(0)


def test_top_k_one_and_a_tiny_top_p_are_greedy() -> None:
    torch.manual_seed(1)
    logits = torch.randn(4, 100)
    best = logits.argmax(-1).tolist()
    for params in (
        GenParams(temperature=1.5, top_k=1, seed=3),
        GenParams(temperature=1.5, top_p=1e-6, seed=3),
    ):
        assert choose_tokens(logits, [params] * 4, [make_generator(params) for _ in range(4)]) == best


def test_top_k_keeps_draws_among_the_k_best() -> None:
    torch.manual_seed(2)
    logits = torch.randn(1, 100)
    top3 = set(torch.topk(logits[0], 3).indices.tolist())
    params = GenParams(temperature=2.0, top_k=3, seed=0)
    gen = make_generator(params)
    draws = {choose_tokens(logits, [params], [gen])[0] for _ in range(200)}
    assert draws <= top3 and len(draws) > 1


def test_stop_reason() -> None:
    rule = {"max_new": 5, "eos": EOS, "decode": letters}
    assert stop_reason([0, 1], stops=None, **rule) is None
    assert stop_reason([0, 25], stops=None, **rule) == FinishReason.STOP
    assert stop_reason([0, 25], stops=None, ignore_eos=True, **rule) is None
    assert stop_reason([0, 1, 2, 3, 4], stops=None, **rule) == FinishReason.LENGTH
    assert stop_reason([7, 4, 11], stops=["el"], **rule) == FinishReason.STOP  # "hel" holds "el"
    assert stop_reason([7, 4], stops=["ell"], **rule) is None
    # a stop string wins over the length budget on the same token
    assert stop_reason([0, 1, 2, 3, 4], stops=["de"], **rule) == FinishReason.STOP


def test_result_text_drops_eos_and_cuts_at_stop_strings() -> None:
    assert result_text([7, 8, 25], FinishReason.STOP, eos=EOS, stops=None, decode=letters) == (
        "hi",
        FinishReason.STOP,
    )
    assert result_text([7, 8, 9], FinishReason.LENGTH, eos=EOS, stops=None, decode=letters) == (
        "hij",
        FinishReason.LENGTH,
    )
    # the stop string and what follows it are cut, and the row finished with stop
    assert result_text([0, 1, 2, 3], FinishReason.LENGTH, eos=EOS, stops=["x", "bc"], decode=letters) == (
        "a",
        FinishReason.STOP,
    )
