"""streamrec: alerts."""
