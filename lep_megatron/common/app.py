"""The one way a stage becomes a command: a hydra app over conf/<stage>.yaml whose bad input
(UserInputError) ends as `lep-megatron <stage>: error: ...` on stderr and exit code 2."""
import functools
import sys

import hydra

from lep_megatron.common.io import UserInputError


def stage_app(stage: str):
    """Decorator: `@stage_app("convert") def main(cfg): ...` reads conf/convert.yaml."""
    def decorate(run):
        @functools.wraps(run)
        def guarded(cfg):
            try:
                return run(cfg)
            except UserInputError as e:
                print(f"lep-megatron {stage}: error: {e}", file=sys.stderr)
                sys.exit(2)

        app = hydra.main(version_base=None, config_path="pkg://lep_megatron.conf", config_name=stage)(guarded)
        app.run = run  # the undecorated stage, for callers that compose the config themselves (pipeline)
        return app

    return decorate
