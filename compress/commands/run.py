"""``compress run``: run a recipe (a whole pipeline in one YAML file)."""
from __future__ import annotations


def register(sub):
    """Add the ``run`` subcommand."""
    p = sub.add_parser("run", help="run a recipe: dataset, model and stages in one YAML file",
                       description="Run the stages of a recipe in order, each stage's artifact feeding the "
                                   "next; finished stages are skipped on rerun.")
    p.add_argument("recipe", help="recipe YAML (e.g. recipes/yolov5s-eagleeye-0.6.yaml)")
    p.add_argument("--out", default=None, help="output folder (default runs/recipes/<name>)")
    p.add_argument("--smoke", action="store_true",
                   help="same stages at a minute-or-two size (1 epoch, tiny dataset, 128 px, few candidates)")
    p.add_argument("--from-stage", type=int, default=None, help="rerun from stage K (1-based), even if done")
    p.add_argument("--check", action="store_true", help="only validate the recipe")
    p.set_defaults(func=run)


def run(args):
    """Validate, then run the recipe."""
    from ..recipe import load_recipe, run_recipe

    if args.check:
        _, stages = load_recipe(args.recipe, args.smoke)
        print(f"{args.recipe}: OK, {len(stages)} stages: {', '.join(s.name for s in stages)}")
        return 0
    run_recipe(args.recipe, args.out, args.smoke, args.from_stage)
    return 0
