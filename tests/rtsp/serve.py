"""A local RTSP server to PLAY from, for the video tests (GStreamer's RTSP server
through Debian's python3-gi; run it with /usr/bin/python3).

    /usr/bin/python3 tests/rtsp/serve.py PORT

Serves rtsp://127.0.0.1:PORT/live, a live 320x240 test pattern at 25 fps in H.264.
Prints "ready" once it listens.
"""
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

Gst.init(None)
port = sys.argv[1]
source = (
    "( videotestsrc is-live=true ! video/x-raw,width=320,height=240,framerate=25/1 ! "
    "x264enc tune=zerolatency speed-preset=ultrafast key-int-max=25 ! "
    "rtph264pay name=pay0 pt=96 config-interval=1 )"
)
server = GstRtspServer.RTSPServer()
server.set_address("127.0.0.1")
server.set_service(port)
factory = GstRtspServer.RTSPMediaFactory()
factory.set_launch(source)
factory.set_shared(True)
server.get_mount_points().add_factory("/live", factory)
server.attach(None)
print("ready", flush=True)
GLib.MainLoop().run()
