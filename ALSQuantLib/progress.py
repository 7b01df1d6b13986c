"""Progress of long steps: to the caller's callback when given, always to the log."""

import logging

LOG = logging.getLogger("ALSQuantLib")


def report(progress, fraction, message, logger=LOG):
    """Log `message` and pass (`fraction` in [0, 1], `message`) to `progress` when it is given."""
    logger.info(message)
    if progress is not None:
        progress(fraction, message)
