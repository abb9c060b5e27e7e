"""streamrec: profiles."""
