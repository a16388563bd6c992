"""The studio's pages and their JSON API, one module per part of the workflow; each has `register(app)`."""
