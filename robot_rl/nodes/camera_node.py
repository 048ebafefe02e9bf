"""camera: OpenCV capture published as sensor_msgs/Image (rgb8) and its JPEG form.

Publishes (SENSOR_QOS, timer at rate_hz):
    camera/image_raw             sensor_msgs/Image rgb8, resized to output_size (square)
    camera/image_raw/compressed  sensor_msgs/CompressedImage 'rgb8; jpeg compressed bgr8'
Parameters: device (index such as "0", or a path/URL), width, height, output_size, rate_hz.
A failed read is logged (throttled) and skipped; the node keeps running.
"""

from __future__ import annotations

import cv2
from rclpy.node import Node
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from robot_rl.nodes import conversions as conv
from robot_rl.nodes.ros_common import declare_all, reject_changes, run, SENSOR_QOS


def open_capture(device: str, width: int, height: int) -> cv2.VideoCapture:
    """cv2.VideoCapture for an index ("0") or a path; ValueError when it cannot open."""
    cap = cv2.VideoCapture(int(device) if device.isdigit() else device)
    if not cap.isOpened():
        raise ValueError(f'cannot open camera {device!r}')
    cap.set(cv2.CAP_PROP_FRAME_WIDTH, width)
    cap.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
    return cap


def frame_to_rgb(bgr, output_size: int):
    """OpenCV BGR frame -> RGB, resized to output_size x output_size (0 = unchanged)."""
    if output_size:
        bgr = cv2.resize(bgr, (output_size, output_size), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


class CameraNode(Node):
    def __init__(self):
        super().__init__('camera')
        self.p = declare_all(self, 'camera')
        self.add_on_set_parameters_callback(reject_changes)
        self.cap = open_capture(self.p['device'], self.p['width'], self.p['height'])
        self.pub_image = self.create_publisher(Image, 'camera/image_raw', SENSOR_QOS)
        self.pub_compressed = self.create_publisher(CompressedImage,
                                                    'camera/image_raw/compressed', SENSOR_QOS)
        self.create_timer(1.0 / self.p['rate_hz'], self.on_tick)

    def on_tick(self) -> None:
        ok, frame = self.cap.read()
        if not ok or frame is None:
            self.get_logger().warn('camera read failed', throttle_duration_sec=2.0)
            return
        rgb = frame_to_rgb(frame, self.p['output_size'])
        header = Header(stamp=self.get_clock().now().to_msg(), frame_id=self.p['frame_id'])
        self.pub_image.publish(conv.rgb_to_image(Image, header, rgb))
        self.pub_compressed.publish(conv.rgb_to_compressed(CompressedImage, header, rgb,
                                                           self.p['jpeg_quality']))

    def destroy_node(self):
        self.cap.release()
        return super().destroy_node()


def main(args=None):
    run(CameraNode, args, threads=1)


if __name__ == '__main__':
    main()
