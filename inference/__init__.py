"""streamrec: inference."""
