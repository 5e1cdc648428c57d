"""The operator console: a single-page web UI served at /console by the gateway itself.

``sessions`` holds signed-in browser sessions and the sign-in throttle (pure code), ``security``
the cookie, CSRF and response-header rules the access guard applies, ``status`` the live figures
of the Overview page, ``routes`` the HTTP routes, and ``static/`` the page (HTML, CSS and plain ES
modules: nothing is built at install time)."""
