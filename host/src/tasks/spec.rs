//! What a task is asked to do, as G.2 writes it (tables G.8-G.14): stored as sent,
//! so the wire layer reads and writes these types too. `extendParams` is the one
//! free-form object the text leaves untyped.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RestartPolicy {
    Never,
    Always,
}

/// Table G.8.
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TaskCreateRequest {
    pub algo_service_id: String,
    pub restart_policy: RestartPolicy,
    pub task_info: TaskInfo,
}

#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TaskInfo {
    pub labels: TaskLabels,
    #[schema(min_items = 1)]
    pub rules_params: Vec<RuleParams>,
    pub stream_options: StreamOptions,
}

#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TaskLabels {
    pub algo_cabin_name: String,
    pub version: String,
}

#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RuleParams {
    pub areas: Vec<AreaParam>,
    #[schema(schema_with = destinations_schema)]
    pub destinations: Destinations,
    /// Not blank.
    #[schema(pattern = r"\S")]
    pub event_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub extend_params: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub masks: Vec<AreaParam>,
}

/// An area of G.2: a polygon (3 points or more) or a line (2 or more).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AreaParam {
    pub areaid: i32,
    pub area_type: AreaType,
    pub points: Vec<PointParam>,
}

impl AreaParam {
    /// Points the area's type needs at least.
    pub fn min_points(area_type: AreaType) -> usize {
        match area_type {
            AreaType::Polygon => 3,
            _ => 2,
        }
    }
}

/// Written by hand: the number of points depends on the type, which a derived
/// schema cannot say.
impl utoipa::PartialSchema for AreaParam {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{
            ArrayBuilder, KnownFormat, ObjectBuilder, OneOfBuilder, Ref, Schema, SchemaFormat, Type,
        };
        let variant = |types: &[&str], min_points: usize| {
            ObjectBuilder::new()
                .property(
                    "areaid",
                    ObjectBuilder::new()
                        .schema_type(Type::Integer)
                        .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int32))),
                )
                .property(
                    "areaType",
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .enum_values(Some(types.iter().copied())),
                )
                .property(
                    "points",
                    ArrayBuilder::new()
                        .items(Ref::from_schema_name("PointParam"))
                        .min_items(Some(min_points)),
                )
                .required("areaid")
                .required("areaType")
                .required("points")
        };
        Schema::OneOf(
            OneOfBuilder::new()
                .item(variant(
                    &["POLYGON"],
                    AreaParam::min_points(AreaType::Polygon),
                ))
                .item(variant(
                    &[
                        "SINGLE_LINE",
                        "SINGLE_LINE_BOTH",
                        "MULTI_LINE",
                        "MULTI_LINE_BOTH",
                    ],
                    AreaParam::min_points(AreaType::SingleLine),
                ))
                .description(Some(
                    "A polygon of 3 points or more, or a line of 2 or more",
                ))
                .build(),
        )
        .into()
    }
}

impl ToSchema for AreaParam {
    fn schemas(
        schemas: &mut Vec<(
            String,
            utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>,
        )>,
    ) {
        use utoipa::PartialSchema;
        schemas.push(("PointParam".into(), PointParam::schema()));
    }
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AreaType {
    Polygon,
    SingleLine,
    SingleLineBoth,
    MultiLine,
    MultiLineBoth,
}

/// Normalised to the frame: 0-1 on both axes, origin top-left.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, ToSchema)]
pub struct PointParam {
    #[schema(minimum = 0, maximum = 1)]
    pub x: f64,
    #[schema(minimum = 0, maximum = 1)]
    pub y: f64,
}

#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Destinations {
    #[serde(rename = "HTTPDest", default, skip_serializing_if = "Option::is_none")]
    pub http_dest: Option<HttpDest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_dest: Option<EventDest>,
}

/// `destinations` as the server reads it: `HTTPDest`, `eventDest` or both, at
/// least one of them (a derived schema would allow `{}` and nulls).
fn destinations_schema() -> utoipa::openapi::Object {
    use utoipa::openapi::schema::{ObjectBuilder, Ref};
    ObjectBuilder::new()
        .property("HTTPDest", Ref::from_schema_name("HttpDest"))
        .property("eventDest", Ref::from_schema_name("EventDest"))
        .min_properties(Some(1))
        .build()
}

#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
pub struct HttpDest {
    /// Where each event is POSTed.
    #[schema(pattern = r"^https?://\S+$")]
    pub url: String,
}

/// G.2's `eventDest`: a message queue for the events, and whether they carry
/// images.
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventDest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mq_dest: Option<MqDest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_dest: Option<ImageDest>,
}

#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MqDest {
    #[schema(pattern = "^KAFKA$")]
    pub mq_type: String,
    /// A Kafka topic name; the topic must exist.
    #[schema(pattern = r"^[A-Za-z0-9._-]{1,249}$")]
    pub topic: String,
    /// The bootstrap brokers: `host:port`, comma-separated.
    #[schema(
        pattern = r"^\s*[^\s,:/]+:(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})\s*(,\s*[^\s,:/]+:(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})\s*)*$"
    )]
    pub url: String,
}

impl MqDest {
    /// `url`'s brokers, as a Kafka client's bootstrap list.
    pub fn brokers(url: &str) -> Vec<String> {
        url.split(',').map(|b| b.trim().to_string()).collect()
    }

    /// What a task can be created with; the error names the field.
    pub fn check(&self) -> Result<(), String> {
        if self.mq_type != "KAFKA" {
            return Err(format!(
                "mqType: {:?} is not supported; KAFKA is",
                self.mq_type
            ));
        }
        let legal = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        if self.topic.is_empty() || self.topic.len() > 249 || !self.topic.chars().all(legal) {
            return Err(format!(
                "topic: {:?} is not a Kafka topic name (1-249 of A-Z a-z 0-9 . _ -)",
                self.topic
            ));
        }
        for broker in Self::brokers(&self.url) {
            let port = broker
                .rsplit_once(':')
                .filter(|(host, _)| {
                    !host.is_empty()
                        && !host.contains(|c: char| c.is_whitespace() || c == '/' || c == ':')
                })
                .and_then(|(_, port)| port.parse::<u16>().ok())
                .filter(|port| *port > 0);
            if port.is_none() {
                return Err(format!(
                    "url: {broker:?} is not host:port (brokers are host:port, comma-separated, no scheme)"
                ));
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageDest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crop_image_dest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_image_dest: Option<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StreamOptions {
    pub video_stream_options: VideoStreamOptions,
}

/// Rule 7: about 2, 4 and 8 megapixels.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, ToSchema)]
pub enum Resolution {
    #[serde(rename = "PIXELS_200W")]
    Pixels200W,
    #[serde(rename = "PIXELS_400W")]
    Pixels400W,
    #[serde(rename = "PIXELS_800W")]
    Pixels800W,
}

impl Resolution {
    pub fn size(self) -> (u32, u32) {
        match self {
            Resolution::Pixels200W => (1920, 1080),
            Resolution::Pixels400W => (2560, 1440),
            Resolution::Pixels800W => (3840, 2160),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct VideoStreamOptions {
    pub resolution: Resolution,
    /// rtsp(s)://, rtmp(s)://, http(s):// (HLS included) or file:///absolute/path.
    #[schema(pattern = r"^((rtsps?|rtmps?|https?)://\S+|file:///.+)$")]
    pub url: String,
}
