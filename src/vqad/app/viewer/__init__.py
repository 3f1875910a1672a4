"""Parts of ``vqad view`` that need no web server: the camera and the frame renderers.

The web viewer itself (viser server, panel, progressive loading) is :mod:`vqad.app.view`.
"""
