"""Small apps declared through the public API, served by real worker processes in tests
(``mesh worker --app tests.apps.greeter:app``)."""
