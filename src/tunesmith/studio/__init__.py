"""tunesmith studio: the whole workflow in a browser (`tunesmith studio`), on tunesmith.api and a database."""
