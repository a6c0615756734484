//! Plane geometry on normalised frame coordinates (0-1, origin top-left, y down).

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pt {
    pub x: f64,
    pub y: f64,
}

/// An axis-aligned box: top-left corner and size.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BoxN {
    pub x: f64,
    pub y: f64,
    pub w: f64,
    pub h: f64,
}

impl BoxN {
    pub fn centre(&self) -> Pt {
        Pt {
            x: self.x + self.w / 2.0,
            y: self.y + self.h / 2.0,
        }
    }

    pub fn area(&self) -> f64 {
        self.w.max(0.0) * self.h.max(0.0)
    }

    pub fn iou(&self, other: &BoxN) -> f64 {
        let x1 = self.x.max(other.x);
        let y1 = self.y.max(other.y);
        let x2 = (self.x + self.w).min(other.x + other.w);
        let y2 = (self.y + self.h).min(other.y + other.h);
        let inter = (x2 - x1).max(0.0) * (y2 - y1).max(0.0);
        let union = self.area() + other.area() - inter;
        if union > 0.0 {
            inter / union
        } else {
            0.0
        }
    }
}

/// Whether `p` lies inside `polygon` (even-odd rule; a point on an edge may go
/// either way).
pub fn inside(p: Pt, polygon: &[Pt]) -> bool {
    let mut inside = false;
    let mut j = polygon.len().wrapping_sub(1);
    for i in 0..polygon.len() {
        let (a, b) = (polygon[i], polygon[j]);
        if (a.y > p.y) != (b.y > p.y) && p.x < (b.x - a.x) * (p.y - a.y) / (b.y - a.y) + a.x {
            inside = !inside;
        }
        j = i;
    }
    inside
}

/// Which side of the directed segment `a -> b` the point `p` is on, seen walking
/// from `a` to `b` on the screen (y down): negative is the left hand, positive the
/// right, zero on the line.
pub fn side(a: Pt, b: Pt, p: Pt) -> f64 {
    (b.x - a.x) * (p.y - a.y) - (b.y - a.y) * (p.x - a.x)
}

/// How a move `from -> to` crosses the segment `a -> b`, if it does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Crossing {
    LeftToRight,
    RightToLeft,
}

impl Crossing {
    pub fn as_str(self) -> &'static str {
        match self {
            Crossing::LeftToRight => "LEFT_TO_RIGHT",
            Crossing::RightToLeft => "RIGHT_TO_LEFT",
        }
    }
}

pub fn crossing(a: Pt, b: Pt, from: Pt, to: Pt) -> Option<Crossing> {
    let (s_from, s_to) = (side(a, b, from), side(a, b, to));
    // The move must go from one side of the line to the other...
    if s_from == 0.0 || s_from.signum() == s_to.signum() {
        return None;
    }
    // ...and the line's segment must separate the two ends of the move.
    let (t_a, t_b) = (side(from, to, a), side(from, to, b));
    if t_a != 0.0 && t_b != 0.0 && t_a.signum() == t_b.signum() {
        return None;
    }
    Some(if s_from < 0.0 {
        Crossing::LeftToRight
    } else {
        Crossing::RightToLeft
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pt(x: f64, y: f64) -> Pt {
        Pt { x, y }
    }

    #[test]
    fn points_in_polygons() {
        let square = [pt(0.2, 0.2), pt(0.8, 0.2), pt(0.8, 0.8), pt(0.2, 0.8)];
        assert!(inside(pt(0.5, 0.5), &square));
        assert!(!inside(pt(0.1, 0.5), &square));
        assert!(!inside(pt(0.5, 0.9), &square));
        let triangle = [pt(0.0, 0.0), pt(1.0, 0.0), pt(0.0, 1.0)];
        assert!(inside(pt(0.2, 0.2), &triangle));
        assert!(!inside(pt(0.8, 0.8), &triangle));
    }

    #[test]
    fn crossings_have_the_direction_of_the_line_as_drawn() {
        // A line drawn upwards: walking up the screen, the left hand is screen-left.
        let (a, b) = (pt(0.5, 0.4), pt(0.5, 0.0));
        assert_eq!(
            crossing(a, b, pt(0.4, 0.2), pt(0.6, 0.2)),
            Some(Crossing::LeftToRight)
        );
        assert_eq!(
            crossing(a, b, pt(0.6, 0.2), pt(0.4, 0.2)),
            Some(Crossing::RightToLeft)
        );
        // Drawn downwards, the same move is right to left.
        assert_eq!(
            crossing(b, a, pt(0.4, 0.2), pt(0.6, 0.2)),
            Some(Crossing::RightToLeft)
        );
        // Past the segment's end, or not across it: no crossing.
        assert_eq!(crossing(a, b, pt(0.4, 0.6), pt(0.6, 0.6)), None);
        assert_eq!(crossing(a, b, pt(0.1, 0.2), pt(0.3, 0.2)), None);
    }

    #[test]
    fn iou_of_boxes() {
        let a = BoxN {
            x: 0.0,
            y: 0.0,
            w: 0.2,
            h: 0.2,
        };
        let b = BoxN {
            x: 0.1,
            y: 0.0,
            w: 0.2,
            h: 0.2,
        };
        assert!((a.iou(&b) - 1.0 / 3.0).abs() < 1e-9);
        assert_eq!(a.iou(&BoxN { x: 0.5, ..a }), 0.0);
    }
}
