"""All SQL lives here: one module per aggregate. Functions take a Session and only flush."""
