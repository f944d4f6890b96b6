"""The after-training commands: `report`, `compare`, `evaluate`, `sweep`, `merge` (`fit` and the rest belong to
LightningCLI)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

VERB_HELP = {
    "report": "plots of loss and rewards for one or more runs, and a summary",
    "compare": "answers of the base and of each adapter to the same prompts, side by side",
    "evaluate": "win-rates judged by a local model, held-out preference accuracy, the judge checked on labels",
    "sweep": "fit every combination of a grid of settings, then tabulate the final rewards",
    "merge": "write the base with the run's adapter merged, in Hugging Face format",
}
VERBS = tuple(VERB_HELP)


class VerbParser(argparse.ArgumentParser):
    """A mistake in the flags is one line and exit code 2; the full usage is for --help."""

    def error(self, message: str):
        print(f"error: {message} (see python {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _check_out(args: argparse.Namespace) -> None:
    """A given --out that cannot be written fails before anything is loaded."""
    from alignment.files import check_writable

    if args.out is not None:
        check_writable(args.out, "--out")


def _report(args: argparse.Namespace, extra: list[str]) -> None:
    from alignment.commands.report import write_report

    write_report(args.runs, args.out)


def _decode(args: argparse.Namespace):
    from alignment.model.generate import DecodeOptions

    return DecodeOptions(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample,
        temperature=args.temperature,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
    )


def _models(args: argparse.Namespace) -> dict:
    """The flags `compare` and `evaluate` share: the models, how they answer, and where."""
    return dict(adapters=args.adapter or [], base=args.base, revision=args.revision, load_in_4bit=args.load_in_4bit,
                decode=_decode(args), chat_template=args.chat_template, prompt_field=args.prompt_field,
                batch_size=args.batch_size, ngram=args.ngram, seed=args.seed, out=args.out)  # fmt: skip


def _compare(args: argparse.Namespace, extra: list[str]) -> None:
    from alignment.commands.compare import run_compare

    run_compare(prompts=args.prompts, **_models(args))


def _evaluate(args: argparse.Namespace, extra: list[str]) -> None:
    from alignment.commands.evaluate import run_evaluate

    run_evaluate(prompts=args.prompts, pairs=args.pairs, pairs_rows=args.pairs_rows, judge=args.judge,
                 judge_revision=args.judge_revision, judge_template=args.judge_template,
                 judge_in_4bit=args.judge_load_in_4bit, judge_mode=args.judge_mode, tie_margin=args.tie_margin,
                 max_length=args.max_length, **_models(args))  # fmt: skip


# the sweep's evaluation flags (dest -> run_evaluate's keyword), None when not given
SWEEP_EVALUATION = {"pairs": "pairs", "pairs_rows": "pairs_rows", "judge": "judge", "judge_revision": "judge_revision",
                    "judge_template": "judge_template", "judge_load_in_4bit": "judge_in_4bit",
                    "judge_mode": "judge_mode", "tie_margin": "tie_margin", "max_length": "max_length",
                    "batch_size": "batch_size", "prompt_field": "prompt_field",
                    "chat_template": "chat_template"}  # fmt: skip


def _sweep(args: argparse.Namespace, extra: list[str]) -> None:
    from alignment.commands.sweep import run_sweep
    from alignment.errors import ConfigError

    given = {key: getattr(args, dest) for dest, key in SWEEP_EVALUATION.items() if getattr(args, dest) is not None}
    if args.evaluate is None:
        stray = [dest for dest in (*SWEEP_EVALUATION, "max_new_tokens") if getattr(args, dest) is not None]
        if stray:
            flag = "--" + stray[0].replace("_", "-")
            raise ConfigError(f"{flag} goes with --evaluate PROMPTS (the prompts the finished runs answer)")
        run_sweep(args.config, args.grid, fit_args=extra, out=args.out)
        return
    if args.max_new_tokens is not None:
        from alignment.model.generate import DecodeOptions

        given["decode"] = DecodeOptions(max_new_tokens=args.max_new_tokens)
    run_sweep(args.config, args.grid, fit_args=extra, out=args.out, evaluate={"prompts": args.evaluate, **given})


def _merge(args: argparse.Namespace, extra: list[str]) -> None:
    from alignment.commands.merge import merge_adapter

    merge_adapter(
        args.run, args.out, dtype=args.dtype, base=args.base, revision=args.revision, overwrite=args.overwrite
    )


def _true_or_false(value: str) -> bool:
    """`--overwrite true`, as fit spells its flags."""
    if value.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")
    return value.lower() == "true"


def build_parser() -> argparse.ArgumentParser:
    parser = VerbParser(prog="cli.py", description="After training: report, compare, evaluate, sweep, merge.")
    verbs = parser.add_subparsers(dest="verb", required=True)

    report = verbs.add_parser("report", help=VERB_HELP["report"])
    report.add_argument("runs", nargs="+", help="run directories (each holds metrics.csv)")
    report.add_argument("--out", help="output directory (default: report/ beside the first run)")
    report.set_defaults(action=_report)

    _add_compare(verbs)
    _add_evaluate(verbs)

    sweep = verbs.add_parser(
        "sweep",
        help=VERB_HELP["sweep"],
        description="Any other flag (e.g. --trainer.limit_train_batches 10) is passed to every `fit`.",
        allow_abbrev=False,  # an unknown fit flag must never be taken for an abbreviation of one of ours
    )
    sweep.add_argument("--config", required=True, help="the experiment's YAML (bare names resolve in configs/)")
    sweep.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2",
                       help="a fit flag without its dashes and the values to try; repeat for more keys")  # fmt: skip
    sweep.add_argument("--out", help="sweep directory (default: runs/<config name>-sweep)")
    _add_sweep_evaluation(sweep)
    sweep.set_defaults(action=_sweep)

    merge = verbs.add_parser("merge", help=VERB_HELP["merge"])
    merge.add_argument("run", help="run directory (or an adapter directory)")
    merge.add_argument("--out", required=True, help="output directory for the merged model and its tokenizer")
    merge.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    merge.add_argument("--base", help="base model (default: the run's model.init_args.base)")
    merge.add_argument("--revision", help="revision of --base (default: the run's)")
    merge.add_argument("--overwrite", type=_true_or_false, default=False, metavar="true|false",
                       help="replace the model --out already holds (never the base, nor a run)")  # fmt: skip
    merge.set_defaults(action=_merge)
    return parser


def _add_compare(verbs) -> None:
    compare = verbs.add_parser(
        "compare",
        help=VERB_HELP["compare"],
        description="Writes compare.md, compare.html and compare.jsonl: one row per prompt, one column per model, "
        "with each answer's repetition score and length, and their averages per model.",
    )
    compare.add_argument("--prompts", required=True, help="JSONL/JSON/Parquet/CSV rows, or TXT (one per line)")
    _add_model_flags(compare, "compare")
    compare.set_defaults(action=_compare)


def _add_model_flags(verb: argparse.ArgumentParser, name: str) -> None:
    verb.add_argument("--prompt-field", default="prompt", help="field holding the prompt in each row")
    verb.add_argument("--adapter", action="append", metavar="NAME=RUN",
                      help="run directory (or adapter directory), named NAME in the table; repeatable")  # fmt: skip
    verb.add_argument("--base", help="base model (default: the first adapter's run base); 'tiny' works offline")
    verb.add_argument("--revision", help="revision of --base (default: the run's)")
    verb.add_argument("--load-in-4bit", action=argparse.BooleanOptionalAction, default=None,
                      help="quantize the base to nf4 (default: as the first adapter's run was trained)")  # fmt: skip
    verb.add_argument("--chat-template", choices=["auto", "on", "off"], default="auto",
                      help="auto: as the run was trained, else when the tokenizer has one")  # fmt: skip
    verb.add_argument("--max-new-tokens", type=int, default=128)
    verb.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    verb.add_argument("--temperature", type=float, default=0.7, help="with --sample")
    verb.add_argument("--top-p", type=float, default=0.9, help="with --sample")
    verb.add_argument("--repetition-penalty", type=float, default=1.0,
                      help="1.0: none, so that the table shows the models' own repetition")  # fmt: skip
    verb.add_argument("--batch-size", type=int, default=8)
    verb.add_argument("--ngram", type=int, default=4, help="n of the repetition score's n-grams (token ids)")
    verb.add_argument("--seed", type=int, default=0, help="seed of sampling (the same for every model)")
    verb.add_argument("--out", help=f"output directory (default: {name}/ beside the first adapter's run)")


def _rows(value: str) -> slice:
    """`--pairs-rows 80:120`: a Python slice of the file's rows (either end may be left out)."""
    start, sep, stop = value.partition(":")
    try:
        if not sep:
            raise ValueError
        return slice(int(start) if start else None, int(stop) if stop else None)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:STOP (row numbers from 0), got {value!r}") from None


def _add_evaluate(verbs) -> None:
    evaluate = verbs.add_parser(
        "evaluate",
        help=VERB_HELP["evaluate"],
        description="Writes evaluate.md and evaluate.jsonl (every answer, log-prob and judgement, both orders). "
        "With --prompts: each pair of models' answers judged by --judge in both orders, position bias removed, as a "
        "win/tie/loss matrix. With --pairs: each model's preference accuracy, and the judge's agreement with the "
        "labels. Answers are cached: another judge regenerates nothing; a stopped evaluation continues.",
    )
    evaluate.add_argument("--prompts", help="prompts to answer and judge: JSONL/JSON/Parquet/CSV rows, or TXT")
    evaluate.add_argument("--pairs", help="labelled preference pairs (as fit reads them): accuracy, judge check")
    evaluate.add_argument("--pairs-rows", type=_rows, default=slice(None), metavar="START:STOP",
                          help="only these rows of --pairs, e.g. 80:120 (rows not trained on)")  # fmt: skip
    evaluate.add_argument("--judge", help="the judge: a hub name, a directory, a .gguf file or smollm2-135m-instruct")
    _add_judge_flags(evaluate)
    _add_model_flags(evaluate, "evaluate")
    evaluate.set_defaults(action=_evaluate)


def _add_judge_flags(verb: argparse.ArgumentParser) -> None:
    """The judge's settings, and how --pairs are scored: `evaluate`'s and `sweep --evaluate`'s."""
    verb.add_argument("--judge-revision", help="revision of --judge")
    verb.add_argument("--judge-mode", choices=("likelihood", "pairwise"), default="likelihood",
                      help="likelihood: each answer scored alone by how much more likely the judge finds it after the "
                      "question than after an empty message; pairwise: the judge picks A or B, both orders "
                      "(default: likelihood)")  # fmt: skip
    verb.add_argument("--judge-template", help="the judge's prompt, with {question}, {answer_a}, {answer_b} "
                      "(default: alignment/assets/judge_template.txt)")  # fmt: skip
    verb.add_argument("--judge-load-in-4bit", action=argparse.BooleanOptionalAction, default=False,
                      help="quantize the judge to nf4 (default: full precision)")  # fmt: skip
    verb.add_argument("--tie-margin", type=float, default=0.05,
                      help="a preference within this of 1/2 (position bias removed) is a tie")  # fmt: skip
    verb.add_argument("--max-length", type=int, default=512, help="tokens of prompt + answer scored per pair")


def _add_sweep_evaluation(sweep: argparse.ArgumentParser) -> None:
    """`sweep --evaluate PROMPTS --judge J`: evaluate's flags, each left None when not given (then evaluate's
    default holds), so that one given without --evaluate is named."""
    sweep.add_argument(
        "--evaluate",
        metavar="PROMPTS",
        help="after the fits, the base and every finished run answer these prompts, judged "
        "by --judge: each run's win-rate against the base in the table (files: OUT/evaluate/)",
    )
    sweep.add_argument("--judge", help="with --evaluate: a hub name, a directory, a .gguf file, smollm2-135m-instruct")
    sweep.add_argument("--pairs", help="with --evaluate: labelled pairs; each run's preference accuracy in the table")
    sweep.add_argument("--pairs-rows", type=_rows, metavar="START:STOP", help="only these rows of --pairs, e.g. 80:120")
    _add_judge_flags(sweep)
    sweep.add_argument("--max-new-tokens", type=int, help="with --evaluate: answers' length (default 128)")
    sweep.add_argument("--batch-size", type=int, help="with --evaluate: prompts per batch (default 8)")
    sweep.add_argument("--prompt-field", help="with --evaluate: field holding the prompt in each row")
    sweep.add_argument("--chat-template", choices=["auto", "on", "off"],
                       help="with --evaluate; auto: as the runs were trained")  # fmt: skip
    sweep.set_defaults(**dict.fromkeys((*SWEEP_EVALUATION, "max_new_tokens"), None))


def run_verb(argv: list[str]) -> bool:
    """Run `argv` if it names an after-training command; False when it is for LightningCLI."""
    if not argv or argv[0] not in VERBS:
        return False
    parser = build_parser()
    parser.prog = f"cli.py {argv[0]}"  # the verb is known: an unrecognized flag points to the verb's --help
    if argv[0] == "sweep":  # flags it does not know go to each fit
        args, extra = parser.parse_known_args(argv)
    else:
        args, extra = parser.parse_args(argv), []
    _check_out(args)
    action: Callable[[argparse.Namespace, list[str]], None] = args.action
    action(args, extra)
    return True
