"""The error that ends a training run with one line (a non-finite loss, a checkpoint that cannot be resumed)."""
import utils


class TrainingError(utils.UserError):
    """Training cannot go on (e.g. a non-finite loss)."""
