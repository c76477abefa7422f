"""Formatting helpers of the pages."""

from ui.format import last_user_turn


def test_last_user_turn_of_a_chatml_prompt():
    # the prompt as SmolLM2's ChatML template renders it for the demo (system preamble first)
    prompt = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM<|im_end|>\n"
              "<|im_start|>user\nLabel the sentiment.\nReview: Great.<|im_end|>\n<|im_start|>assistant\n")
    assert last_user_turn(prompt) == "Label the sentiment.\nReview: Great."


def test_plain_prompt_is_shown_as_it_is():
    assert last_user_turn("What is 1 plus 2?") == "What is 1 plus 2?"
