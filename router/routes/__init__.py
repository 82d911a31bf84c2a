"""The router's HTTP routes, one ``APIRouter`` per area (the OpenAI API, outcome feedback, operations and admin, the
operator page); ``router.app`` includes them all behind its one authentication dependency. A handler reads the
router's state from ``request.app.state``."""
