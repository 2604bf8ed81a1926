"""`lorakit generate`: one reply through the chat template, for a quick look at a run."""

from __future__ import annotations

import sys

import click

from lorakit.errors import LorakitError


@click.command()
@click.argument("target")
@click.argument("prompt", required=False)
@click.option("--system", help="A system message to put before the prompt.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True,
              help="Longest reply generated.")
@click.option("--device", type=click.Choice(["auto", "cuda", "mps", "xpu", "cpu"]), default=None,
              help="Force a device (default: the recipe's model.device, auto).")
def command(target: str, prompt: str | None, system: str | None, max_new_tokens: int, device: str | None) -> None:
    """Reply to PROMPT (or to standard input, when PROMPT is - or left out) with TARGET.

    TARGET is a run folder, a merged model folder, a Hub model id or a recipe. The prompt goes through the chat
    template as a user message and the reply is decoded greedily, as `lorakit eval` does; only the reply is
    printed to standard output.
    """
    if prompt is None or prompt == "-":
        if sys.stdin.isatty():
            raise LorakitError('give a PROMPT, e.g. lorakit generate runs/quickstart "Hello", or pipe one in')
        prompt = sys.stdin.read().rstrip("\n")  # the newline that echo and editors add is not part of it
    if not prompt.strip():
        raise LorakitError("the prompt is empty")
    click.echo(generate_reply(target, prompt, system=system, max_new_tokens=max_new_tokens, device=device))


def generate_reply(target_name: str, prompt: str, *, system: str | None = None, max_new_tokens: int = 256,
                   device: str | None = None) -> str:
    from lorakit.models.loading import quiet_upstream_logs
    from lorakit.models.inference import (chat_prompt_ids, decode_reply, generate_greedy, load_target_model,
                                   load_target_tokenizer, resolve_target)
    from lorakit.models.loading import choose_placement

    quiet_upstream_logs()
    target = resolve_target(target_name)
    tokenizer = load_target_tokenizer(target)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    try:
        prompt_ids = chat_prompt_ids(tokenizer, messages)
    except Exception as error:  # a template that rejects this conversation (e.g. no system role) says why
        raise LorakitError(f"the chat template of {target_name} cannot render this prompt: {error}") from None
    placement = choose_placement(target.model_section, device)
    click.echo(f"lorakit: {target_name} on {placement.device_name}", err=True)
    model = load_target_model(target, placement)
    [reply] = generate_greedy(model, tokenizer, [prompt_ids], max_new_tokens=max_new_tokens, batch_size=1)
    return decode_reply(tokenizer, reply)
