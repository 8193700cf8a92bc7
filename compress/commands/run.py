"""``compress run``: run a recipe (a whole pipeline in one YAML file)."""
from __future__ import annotations


def register(sub):
    """Add the ``run`` subcommand."""
    p = sub.add_parser("run", help="run a recipe: dataset, model and stages in one YAML file",
                       description="Run the stages of a recipe in order, each stage's artifact feeding the "
                                   "next; finished stages are skipped on rerun and an interrupted train or "
                                   "eagleeye stage is resumed.")
    p.add_argument("recipe", help="recipe YAML (e.g. recipes/yolov5s-eagleeye-0.6.yaml)")
    p.add_argument("--out", default=None, help="output folder (default: runs/recipes/<name>)")
    p.add_argument("--smoke", action="store_true",
                   help="same stages at a minute-or-two size (1 epoch, tiny dataset, 128 px, few candidates)")
    p.add_argument("--from-stage", type=int, default=None, help="rerun from stage K (1-based), even if done")
    p.add_argument("--check", action="store_true",
                   help="only check the recipe: keys, every stage's option values, the dataset and the model")
    p.set_defaults(func=run)


def run(args):
    """Check, then run the recipe."""
    from ..recipe import check_recipe, run_recipe

    if args.check:
        _, stages = check_recipe(args.recipe, args.smoke, args.from_stage)
        print(f"{args.recipe}: OK, {len(stages)} stages: {', '.join(s.name for s in stages)}")
        return 0
    run_recipe(args.recipe, args.out, args.smoke, args.from_stage)
    return 0
