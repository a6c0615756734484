//! A frame's events as they are delivered (docs/events.md): one JSON document per
//! event, for the destinations of the rule it belongs to, with the JPEG images
//! that rule asks for.

use base64::Engine as _;
use serde::Serialize;
use utoipa::ToSchema;

use super::spec::{self, AreaType};
use super::TaskRecord;
use crate::pipeline::deliver::Destination;
use crate::pipeline::snapshot;
use crate::runtime::bindings::analyzer::Event;
use crate::runtime::frames::Frame;

/// Events one frame may raise; the rest are dropped (counted): a plugin must not
/// make the host queue without bound.
const MAX_EVENTS_PER_FRAME: usize = 256;
/// Longest `attributes` text of one event kept in its document (with the queue's
/// bounds, what one task can make the host store stays under 64 MiB).
const MAX_ATTRIBUTES_BYTES: usize = 16 * 1024;
/// Longest event type or label an event may carry; longer ones drop the event.
const MAX_NAME_BYTES: usize = 256;

/// Objects of one frame whose box is sent as an image; past it objects go without
/// one (logged): encoding is paid on the pipeline's thread.
const MAX_CROPS_PER_FRAME: usize = 32;
/// Image bytes (base64) one frame's documents may carry in all, each copy counted:
/// 256 events asking for a 4K frame must not make the host hold gigabytes.
const MAX_IMAGE_BYTES_PER_FRAME: usize = 16 * 1024 * 1024;

/// A frame's events as documents, grouped by destination, in the order raised.
pub(super) fn documents(
    task: &TaskRecord,
    algo_id: &str,
    frame: &Frame,
    events: &[Event],
) -> Vec<(Destination, Vec<String>)> {
    if events.len() > MAX_EVENTS_PER_FRAME {
        tracing::warn!(task = %task.id, raised = events.len(), kept = MAX_EVENTS_PER_FRAME, "too many events on one frame: the rest are dropped");
    }
    let (named, misnamed): (Vec<&Event>, Vec<&Event>) = events
        .iter()
        .take(MAX_EVENTS_PER_FRAME)
        .partition(|e| e.event_type.len() <= MAX_NAME_BYTES && e.label.len() <= MAX_NAME_BYTES);
    if !misnamed.is_empty() {
        tracing::warn!(task = %task.id, dropped = misnamed.len(), "events with an event type or label over {MAX_NAME_BYTES} bytes dropped");
    }
    let mut snapshots = Snapshots::new(&task.id, frame);
    let mut by_destination: Vec<(Destination, Vec<String>)> = Vec::new();
    for event in named {
        let Some((rule, document)) = event_document(task, algo_id, frame, event, &mut snapshots)
        else {
            continue;
        };
        for destination in destinations(&task.task_info.rules_params[rule].destinations) {
            match by_destination.iter_mut().find(|(d, _)| *d == destination) {
                Some((_, docs)) => docs.push(document.clone()),
                None => by_destination.push((destination, vec![document.clone()])),
            }
        }
    }
    by_destination
}

/// The images of one frame's events, encoded when first asked for: one full
/// frame however many events carry it.
struct Snapshots<'f> {
    task: &'f str,
    frame: &'f Frame,
    full: Option<Option<String>>,
    crops: usize,
    /// Image bytes still allowed on this frame's documents.
    budget: usize,
}

impl<'f> Snapshots<'f> {
    fn new(task: &'f str, frame: &'f Frame) -> Snapshots<'f> {
        Snapshots {
            task,
            frame,
            full: None,
            crops: 0,
            budget: MAX_IMAGE_BYTES_PER_FRAME,
        }
    }

    /// `image`, if the frame's budget still has room for it.
    fn spend(&mut self, image: Option<String>) -> Option<String> {
        let image = image?;
        if image.len() > self.budget {
            if self.budget > 0 {
                tracing::warn!(task = %self.task, "over {MAX_IMAGE_BYTES_PER_FRAME} bytes of images on one frame: the rest of its events go without");
                self.budget = 0;
            }
            return None;
        }
        self.budget -= image.len();
        Some(image)
    }

    /// The frame as a base64 JPEG (none if it cannot be encoded: logged).
    fn full(&mut self) -> Option<String> {
        let (task, frame) = (self.task, self.frame);
        let image = self
            .full
            .get_or_insert_with(|| match snapshot::full(frame) {
                Ok(jpeg) => Some(base64::engine::general_purpose::STANDARD.encode(jpeg)),
                Err(e) => {
                    tracing::warn!(%task, "event sent without its image: {e}");
                    None
                }
            })
            .clone();
        self.spend(image)
    }

    /// A normalised box of the frame as a base64 JPEG.
    fn crop(&mut self, x: f64, y: f64, width: f64, height: f64) -> Option<String> {
        self.crops += 1;
        if self.crops > MAX_CROPS_PER_FRAME {
            if self.crops == MAX_CROPS_PER_FRAME + 1 {
                tracing::warn!(task = %self.task, "over {MAX_CROPS_PER_FRAME} object images on one frame: the rest go without");
            }
            return None;
        }
        let image = match snapshot::crop(self.frame, x, y, width, height)? {
            Ok(jpeg) => Some(base64::engine::general_purpose::STANDARD.encode(jpeg)),
            Err(e) => {
                tracing::warn!(task = %self.task, "object sent without its image: {e}");
                None
            }
        };
        self.spend(image)
    }
}

/// Where a rule's events are delivered (checked by `validate`).
fn destinations(d: &spec::Destinations) -> Vec<Destination> {
    let http = d
        .http_dest
        .iter()
        .map(|h| Destination::Http { url: h.url.clone() });
    let kafka = d
        .event_dest
        .iter()
        .filter_map(|e| e.mq_dest.as_ref())
        .map(|mq| Destination::Kafka {
            brokers: spec::MqDest::brokers(&mq.url),
            topic: mq.topic.clone(),
        });
    http.chain(kafka).collect()
}

/// The rule an event belongs to: the one holding its area, else the one whose
/// eventType it carries, else the first.
fn rule_of(task: &TaskRecord, event: &Event) -> usize {
    let rules = &task.task_info.rules_params;
    event
        .area_id
        .and_then(|id| {
            rules
                .iter()
                .position(|r| r.areas.iter().any(|a| a.areaid == id))
        })
        .or_else(|| {
            rules
                .iter()
                .position(|r| r.event_type == event.event_type || r.event_type == event.label)
        })
        .unwrap_or(0)
}

/// One event as it is delivered: its JSON document (docs/events.md), one per
/// event, to each destination of its rule.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventDocument {
    /// Made when the event is queued; the same on every retry.
    pub event_id: String,
    pub task_id: String,
    pub algo_service_id: String,
    /// The service's algorithm (E.6 id).
    pub algo_id: String,
    /// What the algorithm says happened (the reference algorithms echo the rule's).
    pub event_type: String,
    /// The object class, or the algorithm's own label.
    pub label: String,
    /// The G.2 area the event is about, if any.
    pub area_id: Option<i32>,
    pub area_type: Option<AreaType>,
    /// For lines, when the algorithm gives one (e.g. `LEFT_TO_RIGHT`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direction: Option<String>,
    /// Milliseconds on the stream's own timeline (the first analysed frame is 0).
    pub timestamp: u64,
    pub objects: Vec<EventObject>,
    /// The algorithm's extra attributes (up to 16 KiB).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub attributes: Option<serde_json::Value>,
    /// The analysed frame, JPEG, base64: when the rule's `imageDest` has a
    /// `fullImageDest`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(content_encoding = "base64", content_media_type = "image/jpeg")]
    pub image: Option<String>,
}

/// An object an event is about.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventObject {
    /// The tracker's id, when the algorithm tracks.
    pub track_id: Option<u64>,
    pub label: String,
    pub confidence: f32,
    pub bbox: BoundingBox,
    /// The object's box of the frame, JPEG, base64: when the rule's `imageDest`
    /// has a `cropImageDest`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(content_encoding = "base64", content_media_type = "image/jpeg")]
    pub image: Option<String>,
}

/// Normalised to the frame: 0-1, origin top-left.
#[derive(Debug, Serialize, ToSchema)]
pub struct BoundingBox {
    pub x: f64,
    pub y: f64,
    pub width: f64,
    pub height: f64,
}

/// An event as it is delivered: the rule it belongs to, and its document with a
/// fresh `eventId` and the images the rule asks for (`imageDest.fullImageDest`:
/// the frame, `cropImageDest`: each object's box).
fn event_document(
    task: &TaskRecord,
    algo_id: &str,
    frame: &Frame,
    event: &Event,
    snapshots: &mut Snapshots,
) -> Option<(usize, String)> {
    let rule = rule_of(task, event);
    let images = task.task_info.rules_params[rule]
        .destinations
        .event_dest
        .as_ref()
        .and_then(|e| e.image_dest.as_ref());
    let full_image = images.is_some_and(|i| i.full_image_dest.is_some());
    let crop_image = images.is_some_and(|i| i.crop_image_dest.is_some());
    let area_type = event.area_id.and_then(|id| {
        task.task_info.rules_params[rule]
            .areas
            .iter()
            .find(|a| a.areaid == id)
            .map(|a| a.area_type)
    });
    let attributes: Option<serde_json::Value> = (event.attributes.len() <= MAX_ATTRIBUTES_BYTES)
        .then(|| serde_json::from_str(&event.attributes).ok())
        .flatten()
        .filter(|a: &serde_json::Value| a.as_object().is_some_and(|o| !o.is_empty()));
    let attribute = |name: &str| attributes.as_ref().and_then(|a| a.get(name));
    let track_id = attribute("trackId").and_then(serde_json::Value::as_u64);
    let direction = attribute("direction")
        .and_then(serde_json::Value::as_str)
        .map(str::to_string);
    let objects = event
        .bbox
        .map(|b| EventObject {
            track_id,
            label: event.label.clone(),
            confidence: event.confidence,
            bbox: BoundingBox {
                x: b.x,
                y: b.y,
                width: b.width,
                height: b.height,
            },
            image: crop_image
                .then(|| snapshots.crop(b.x, b.y, b.width, b.height))
                .flatten(),
        })
        .into_iter()
        .collect();
    let document = EventDocument {
        event_id: uuid::Uuid::new_v4().to_string(),
        task_id: task.id.clone(),
        algo_service_id: task.algo_service_id.clone(),
        algo_id: algo_id.to_string(),
        event_type: event.event_type.clone(),
        label: event.label.clone(),
        area_id: event.area_id,
        area_type,
        direction,
        timestamp: frame.timestamp_ms(),
        objects,
        attributes,
        image: full_image.then(|| snapshots.full()).flatten(),
    };
    match serde_json::to_string(&document) {
        Ok(json) => Some((rule, json)),
        // Plain data with no maps of non-string keys: this does not fail.
        Err(e) => {
            tracing::error!(task = %task.id, "event dropped: its document: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::bindings::wit_frames::PixelFormat;
    use crate::tasks::spec::RestartPolicy;
    use crate::tasks::TaskStatus;

    fn task() -> TaskRecord {
        let area = |id: i32| {
            serde_json::json!({ "areaid": id, "areaType": "POLYGON",
                "points": [{"x": 0.0, "y": 0.0}, {"x": 1.0, "y": 0.0}, {"x": 0.0, "y": 1.0}] })
        };
        let rule = |id: i32, event: &str| {
            serde_json::json!({ "areas": [area(id)], "eventType": event, "masks": [],
                "destinations": { "HTTPDest": { "url": "http://127.0.0.1:9/e" } } })
        };
        TaskRecord {
            id: "t".into(),
            algo_service_id: "s".into(),
            restart_policy: RestartPolicy::Never,
            task_info: serde_json::from_value(serde_json::json!({
                "labels": { "algoCabinName": "c", "version": "1" },
                "rulesParams": [rule(1, "A"), rule(2, "B")],
                "streamOptions": { "videoStreamOptions": {
                    "resolution": "PIXELS_200W", "url": "file:///v.mp4" } }
            }))
            .unwrap(),
            status: TaskStatus::Running,
            status_desc: String::new(),
            created_ms: 0,
            moves: Vec::new(),
        }
    }

    fn document(task: &TaskRecord, frame: &Frame, event: &Event) -> (usize, String) {
        event_document(task, "algo", frame, event, &mut Snapshots::new("t", frame)).unwrap()
    }

    fn event(area: Option<i32>, event_type: &str, attributes: String) -> Event {
        Event {
            event_type: event_type.into(),
            area_id: area,
            bbox: None,
            label: String::new(),
            confidence: 1.0,
            attributes,
        }
    }

    #[test]
    fn events_go_to_their_rule_and_oversized_attributes_stay_out() {
        let task = task();
        let frame = Frame::new(4, 4, 1200, PixelFormat::Gray8, vec![0u8; 16].into()).unwrap();
        let (rule, doc) = document(&task, &frame, &event(Some(2), "X", "{}".into()));
        assert_eq!(rule, 1);
        let doc: serde_json::Value = serde_json::from_str(&doc).unwrap();
        assert_eq!(doc["areaType"], "POLYGON");
        assert_eq!(doc["timestamp"], 1200);
        assert!(doc.get("attributes").is_none());
        let (rule, _) = document(&task, &frame, &event(None, "A", "{}".into()));
        assert_eq!(rule, 0);
        let big = format!("{{\"x\": \"{}\"}}", "y".repeat(MAX_ATTRIBUTES_BYTES));
        let (_, doc) = document(&task, &frame, &event(Some(1), "A", big));
        assert!(!doc.contains("yyyy"), "oversized attributes are left out");
        let (_, doc) = document(
            &task,
            &frame,
            &event(
                Some(1),
                "A",
                r#"{"trackId": 4, "direction": "LEFT_TO_RIGHT"}"#.into(),
            ),
        );
        let doc: serde_json::Value = serde_json::from_str(&doc).unwrap();
        assert_eq!(doc["direction"], "LEFT_TO_RIGHT");
        assert_eq!(doc["attributes"]["trackId"], 4);
    }

    /// A rule with `imageDest` gets the frame as `image` and each object's box as
    /// its `image` (both JPEG, base64); a rule without gets neither.
    #[test]
    fn images_go_with_the_events_of_rules_that_ask_for_them() {
        let mut task = task();
        task.task_info.rules_params[1].destinations = serde_json::from_value(serde_json::json!({
            "HTTPDest": { "url": "http://127.0.0.1:9/e" },
            "eventDest": { "imageDest": { "cropImageDest": "crops", "fullImageDest": "frames" } }
        }))
        .unwrap();
        let pixels: Vec<u8> = (0..64 * 48 * 3).map(|i| (i % 7 * 30) as u8).collect();
        let frame = Frame::new(64, 48, 0, PixelFormat::Rgb8, pixels.into()).unwrap();
        let boxed = |area: i32| Event {
            bbox: Some(crate::runtime::bindings::analyzer::BoundingBox {
                x: 0.25,
                y: 0.25,
                width: 0.5,
                height: 0.5,
            }),
            ..event(Some(area), "X", "{}".into())
        };
        let jpeg = |v: &serde_json::Value| {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(v.as_str().expect("an image"))
                .unwrap();
            assert_eq!(&bytes[..2], &[0xFF, 0xD8], "a JPEG");
            bytes.len()
        };
        let (rule, with) = document(&task, &frame, &boxed(2));
        assert_eq!(rule, 1);
        let with: serde_json::Value = serde_json::from_str(&with).unwrap();
        let full = jpeg(&with["image"]);
        let crop = jpeg(&with["objects"][0]["image"]);
        assert!(crop < full, "the crop is the box only");
        let (_, without) = document(&task, &frame, &boxed(1));
        let without: serde_json::Value = serde_json::from_str(&without).unwrap();
        assert!(without.get("image").is_none());
        assert!(without["objects"][0].get("image").is_none());
    }

    /// One frame's documents carry at most `MAX_CROPS_PER_FRAME` crops and
    /// `MAX_IMAGE_BYTES_PER_FRAME` of images, however many events ask.
    #[test]
    fn a_frames_images_are_bounded() {
        // Noise: a JPEG that does not compress (a few MB for 1080p).
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let pixels: Vec<u8> = (0..1920 * 1080 * 3)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        let frame = Frame::new(1920, 1080, 0, PixelFormat::Rgb8, pixels.into()).unwrap();
        let mut snapshots = Snapshots::new("t", &frame);
        let crops = (0..MAX_CROPS_PER_FRAME + 8)
            .filter_map(|_| snapshots.crop(0.0, 0.0, 0.01, 0.01))
            .count();
        assert_eq!(crops, MAX_CROPS_PER_FRAME);
        let mut carried = 0;
        let mut copies = 0;
        while let Some(image) = snapshots.full() {
            carried += image.len();
            copies += 1;
            assert!(copies < 256, "the budget never ran out");
        }
        assert!(
            copies >= 1 && carried <= MAX_IMAGE_BYTES_PER_FRAME,
            "{copies} copies, {carried} bytes"
        );
        assert!(snapshots.full().is_none(), "spent stays spent");
    }
}
