"""llmctl.stages.generate's decoding on a tiny model: each option changes what is generated
the way it says (the CLI end to end is in tests/stages/test_generate.py)."""

import pytest
import torch

from llmctl.schema import GenerateConfig

PROMPT = "The function returns"


@pytest.fixture(scope="module")
def lm(tiny_lm):
    from llmctl.models import load_causal_lm, load_tokenizer

    return load_causal_lm(str(tiny_lm)).eval(), load_tokenizer(str(tiny_lm))


def decode(lm, **options):
    from llmctl.stages.generate import generate

    model, tokenizer = lm
    cfg = GenerateConfig(max_new_tokens=12, min_new_tokens=12, **options)
    completions, new_tokens = generate(model, tokenizer, PROMPT, cfg)
    return completions, new_tokens


def new_ids(lm, text: str) -> list[int]:
    return lm[1](text, add_special_tokens=False)["input_ids"]


@torch.inference_mode()
def test_greedy_is_the_argmax_path(lm):
    model, tokenizer = lm
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    for _ in range(12):
        logits = model(input_ids=ids).logits[0, -1]
        logits[tokenizer.eos_token_id] = -float("inf")  # min_new_tokens = 12
        ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
    expected = tokenizer.decode(ids[0, -12:], skip_special_tokens=True)
    assert decode(lm) == ([expected], 12)


def test_sampling_follows_the_seed_and_top_k_1_is_greedy(lm):
    greedy = decode(lm)[0]
    torch.manual_seed(0)
    assert decode(lm, do_sample=True, top_k=1)[0] == greedy
    draws = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        draws.append(decode(lm, do_sample=True, top_k=0, temperature=5.0)[0])
    assert draws[0] == draws[1] != draws[2] and draws[0] != greedy


def test_repetition_options_take_effect(lm):
    greedy = decode(lm)[0][0]
    assert len(set(new_ids(lm, greedy))) < 12 // 2  # a random tiny model loops...
    no_repeat = decode(lm, no_repeat_ngram_size=1)[0][0]
    # ...and no_repeat_ngram_size = 1 forbids any generated token twice (re-tokenising the
    # decoded text can merge pieces, so count distinct ids rather than compare lists).
    assert len(set(new_ids(lm, no_repeat))) > len(set(new_ids(lm, greedy)))
    assert decode(lm, repetition_penalty=50.0)[0][0] != greedy


def test_beams_and_return_sequences(lm):
    beams = decode(lm, num_beams=3, num_return_sequences=3)[0]
    assert len(beams) == 3 and len(set(beams)) == 3  # three different hypotheses
    assert decode(lm, num_beams=3)[0] == beams[:1]  # the best beam is what one return gives


def test_stop_cuts_at_the_first_stop_string(lm):
    text = decode(lm)[0][0]
    stop = text[len(text) // 2:][:2]
    cut = decode(lm, stop=[stop])[0][0]
    assert cut == text[:text.index(stop)] and stop not in cut


def test_streamed_pieces_add_up_to_the_answer_cut_at_the_stop(lm):
    """`llmctl serve` streams through StopAwareStreamer: never text past a stop string, nor a
    tail that might begin one, and the pieces join to the non-streamed answer."""
    from llmctl.serve import StopAwareStreamer

    tokenizer = lm[1]
    ids = tokenizer("alpha beta gamma STOP delta", add_special_tokens=False)["input_ids"]
    for stops, expected in [([], "alpha beta gamma STOP delta"),
                            (["STOP"], "alpha beta gamma "), (["gam", "zzz"], "alpha beta ")]:
        pieces = []
        streamer = StopAwareStreamer(tokenizer, stops, pieces.append)
        streamer.put(torch.tensor([[1, 2]]))  # the prompt comes first and is not streamed
        for token in ids:
            streamer.put(torch.tensor([token]))
            assert not any(s in "".join(pieces) for s in stops)
        streamer.end()
        assert "".join(pieces).strip() == expected.strip() and len(pieces) > 1


def test_templates_turn_prompts_into_model_input():
    import json

    from llmctl.data import Template
    from llmctl.errors import UserError
    from llmctl.stages.generate import apply_template

    # "text" (a pretraining template: all response) is a plain continuation, as no template is
    assert apply_template(Template.get("text"), "The function returns") == "The function returns"
    assert apply_template(None, "The function returns") == "The function returns"
    assert apply_template(Template.get("qa"), "Why?") == "Question: Why?\n\nAnswer:"
    two = json.dumps({"instruction": "Sentiment?", "input": "Shares fell."})
    assert "Content: Shares fell." in apply_template(Template.get("sentiment"), two)
    with pytest.raises(UserError, match="give each prompt as a JSON object"):
        apply_template(Template.get("sentiment"), "plain")


def test_latency_reports_its_spread(lm):
    from llmctl.latency import prompt_ids, time_generation

    model, tokenizer = lm
    timing = time_generation(model, prompt_ids(tokenizer, 8, 1), 6, runs=3,
                             pad_token_id=tokenizer.pad_token_id)
    assert 0 < timing["seconds_min"] <= timing["seconds"] <= timing["seconds_max"]
    assert timing["tokens_per_second"] == pytest.approx(6 / timing["seconds"])
