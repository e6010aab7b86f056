"""Reading and writing user files safely: bounded readers, atomic output sets, no write over an input."""
