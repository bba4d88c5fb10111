//! FHIR R4 date, dateTime, instant and Period values read as half-open ranges of UTC time.
//!
//! A written value covers every instant its precision leaves open, so `2012-06` is all of June
//! 2012. [`DateRange`] is the main type. This module reads no clock: callers pass times in.

use std::fmt;

/// Nanoseconds in one second, the unit of [`DateRange`] bounds.
pub const NANOS_PER_SECOND: i128 = 1_000_000_000;

const SECONDS_PER_DAY: i64 = 86_400;

/// Days from 0001-01-01 to 1970-01-01 in the proleptic Gregorian calendar.
const DAYS_FROM_YEAR_ONE_TO_EPOCH: i64 = 719_162;

/// Days before the first of each month in a common year.
const DAYS_BEFORE_MONTH: [i64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];

/// Half-open range `[start, end)` of instants, in nanoseconds since 1970-01-01T00:00:00Z.
///
/// Nanoseconds need `i128`, because `i64` nanoseconds reach only about 292 years from 1970 and
/// FHIR years run from 0001 to 9999. A Period without a start has `start == i128::MIN`, and one
/// without an end has `end == i128::MAX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DateRange {
    /// First instant in the range, in nanoseconds since the Unix epoch.
    pub start: i128,
    /// First instant after the range, in nanoseconds since the Unix epoch.
    pub end: i128,
}

impl DateRange {
    /// Start bound of a Period that has no start.
    pub const UNBOUNDED_START: i128 = i128::MIN;

    /// End bound of a Period that has no end, such as an ongoing encounter.
    pub const UNBOUNDED_END: i128 = i128::MAX;

    /// Returns the range that contains only the given nanosecond.
    pub fn at_instant(nanos: i128) -> DateRange {
        DateRange {
            start: nanos,
            end: nanos.saturating_add(1),
        }
    }

    /// Checks whether `other` lies entirely inside this range.
    pub fn contains(&self, other: &DateRange) -> bool {
        self.start <= other.start && other.end <= self.end
    }

    /// Checks whether the two ranges share at least one instant.
    pub fn overlaps(&self, other: &DateRange) -> bool {
        self.start < other.end && other.start < self.end
    }

    /// Returns the length of the range in nanoseconds, saturating for open Periods.
    pub fn duration_nanos(&self) -> i128 {
        self.end.saturating_sub(self.start)
    }
}

/// Reason a date value could not be read. Messages name the failing part, never the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DateTimeError {
    /// The value is an empty string.
    Empty,
    /// A character is not what the format allows at that place.
    Malformed {
        /// Zero-based character offset of the first unexpected character.
        position: usize,
        /// Description of the characters that the format allows at that place.
        expected: &'static str,
    },
    /// A field has a value outside its range, such as month 13 or February 30.
    OutOfRange {
        /// Name of the field: year, month, day, hour, minute, second or time zone offset.
        field: &'static str,
    },
    /// A resource dateTime has a time but no time zone offset, which FHIR R4 forbids.
    MissingTimeZone,
    /// A resource dateTime has hours and minutes but no seconds, which FHIR R4 forbids.
    MissingSeconds,
    /// A Period starts after it ends.
    ReversedPeriod,
}

impl fmt::Display for DateTimeError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DateTimeError::Empty => write!(formatter, "date is empty"),
            DateTimeError::Malformed { position, expected } => {
                write!(
                    formatter,
                    "invalid date: expected {expected} at character {position}"
                )
            }
            DateTimeError::OutOfRange { field } => {
                write!(formatter, "invalid date: {field} out of range")
            }
            DateTimeError::MissingTimeZone => {
                write!(
                    formatter,
                    "invalid date: a time must have a time zone offset"
                )
            }
            DateTimeError::MissingSeconds => {
                write!(formatter, "invalid date: a time must have seconds")
            }
            DateTimeError::ReversedPeriod => {
                write!(formatter, "invalid period: start is after end")
            }
        }
    }
}

impl std::error::Error for DateTimeError {}

/// Parses a FHIR R4 `date`, `dateTime` or `instant` value from a resource into the range it
/// covers.
///
/// A value without a time (`2012`, `2012-06`, `2012-06-15`) covers its whole year, month or day
/// in UTC. FHIR leaves the zone of such values to the server, and this server uses UTC for them
/// and for search values without an offset, so both sides agree. A time must have seconds and an
/// offset, as FHIR R4 requires, and covers one second, or one unit of its last fraction digit.
///
/// # Errors
///
/// Returns a [`DateTimeError`] when the value does not follow the FHIR format or names a day that
/// does not exist, such as 2013-02-29.
pub fn parse_fhir_date_time(text: &str) -> Result<DateRange, DateTimeError> {
    parse_date_value(
        text,
        Rules {
            require_seconds: true,
            require_time_zone: true,
        },
    )
}

/// Parses the date part of a FHIR search value (after any prefix) into the range it covers.
///
/// Search values follow the FHIR R4 search rules, which are looser than the resource format.
/// A time may stop at minutes. A value without an offset is read as UTC, the same zone that this
/// module gives to resource values without one.
///
/// # Errors
///
/// Returns a [`DateTimeError`] when the value is not a date or names a day that does not exist.
pub fn parse_search_date(text: &str) -> Result<DateRange, DateTimeError> {
    parse_date_value(
        text,
        Rules {
            require_seconds: false,
            require_time_zone: false,
        },
    )
}

/// Parses a FHIR Period from its optional `start` and `end` into the range it covers.
///
/// A missing start or end leaves that side open. The end is inclusive at its own precision,
/// so a Period ending `2012-06-15` includes all of that day.
///
/// # Errors
///
/// Returns a [`DateTimeError`] when either bound is invalid, or
/// [`DateTimeError::ReversedPeriod`] when the range would be empty because the start is after
/// the end.
pub fn parse_period(start: Option<&str>, end: Option<&str>) -> Result<DateRange, DateTimeError> {
    let start = match start {
        Some(text) => parse_fhir_date_time(text)?.start,
        None => DateRange::UNBOUNDED_START,
    };
    let end = match end {
        Some(text) => parse_fhir_date_time(text)?.end,
        None => DateRange::UNBOUNDED_END,
    };
    if start >= end {
        return Err(DateTimeError::ReversedPeriod);
    }
    Ok(DateRange { start, end })
}

/// Checks whether a year of the proleptic Gregorian calendar has 29 February.
pub fn is_leap_year(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

/// Returns the number of days in a month (1 to 12) of a Gregorian year, or 0 for another month.
pub fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap_year(year) => 29,
        2 => 28,
        _ => 0,
    }
}

/// Counts the days from 1970-01-01 to a date of the proleptic Gregorian calendar.
///
/// The result is negative for dates before 1970. The caller checks that `year` is at least 1,
/// `month` is 1 to 12 and `day` exists in that month, because other inputs give a meaningless
/// count.
pub fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let years_before = year - 1;
    let leap_days_before = years_before / 4 - years_before / 100 + years_before / 400;
    let days_before_year = 365 * years_before + leap_days_before;

    let month_index = month.clamp(1, 12) as usize - 1;
    let leap_day_this_year = i64::from(month > 2 && is_leap_year(year));
    let days_before_month = DAYS_BEFORE_MONTH[month_index] + leap_day_this_year;

    days_before_year + days_before_month + i64::from(day) - 1 - DAYS_FROM_YEAR_ONE_TO_EPOCH
}

/// Format rules that differ between resource values and search values.
#[derive(Clone, Copy)]
struct Rules {
    require_seconds: bool,
    require_time_zone: bool,
}

/// Reads fixed-width fields from an ASCII date string.
struct Cursor<'a> {
    bytes: &'a [u8],
    position: usize,
}

impl<'a> Cursor<'a> {
    fn is_done(&self) -> bool {
        self.position >= self.bytes.len()
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.position).copied()
    }

    fn malformed(&self, expected: &'static str) -> DateTimeError {
        DateTimeError::Malformed {
            position: self.position,
            expected,
        }
    }

    /// Consumes `byte` if it comes next.
    fn accept(&mut self, byte: u8) -> bool {
        if self.peek() == Some(byte) {
            self.position += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, byte: u8, expected: &'static str) -> Result<(), DateTimeError> {
        if self.accept(byte) {
            Ok(())
        } else {
            Err(self.malformed(expected))
        }
    }

    /// Reads exactly `count` decimal digits as a number.
    fn digits(&mut self, count: usize, expected: &'static str) -> Result<u32, DateTimeError> {
        let mut number = 0u32;
        for _ in 0..count {
            match self.peek() {
                Some(byte @ b'0'..=b'9') => {
                    number = number * 10 + u32::from(byte - b'0');
                    self.position += 1;
                }
                _ => return Err(self.malformed(expected)),
            }
        }
        Ok(number)
    }
}

fn parse_date_value(text: &str, rules: Rules) -> Result<DateRange, DateTimeError> {
    if text.is_empty() {
        return Err(DateTimeError::Empty);
    }
    let mut cursor = Cursor {
        bytes: text.as_bytes(),
        position: 0,
    };

    // Date part: each field is optional only when everything after it is absent too.
    let year = i64::from(cursor.digits(4, "a four-digit year")?);
    if year == 0 {
        return Err(DateTimeError::OutOfRange { field: "year" });
    }
    if cursor.is_done() {
        return Ok(whole_days(
            days_from_civil(year, 1, 1),
            days_from_civil(year + 1, 1, 1),
        ));
    }

    cursor.expect(b'-', "'-' after the year")?;
    let month = cursor.digits(2, "a two-digit month")?;
    if !(1..=12).contains(&month) {
        return Err(DateTimeError::OutOfRange { field: "month" });
    }
    if cursor.is_done() {
        let (next_year, next_month) = if month == 12 {
            (year + 1, 1)
        } else {
            (year, month + 1)
        };
        return Ok(whole_days(
            days_from_civil(year, month, 1),
            days_from_civil(next_year, next_month, 1),
        ));
    }

    cursor.expect(b'-', "'-' after the month")?;
    let day = cursor.digits(2, "a two-digit day")?;
    if day == 0 || day > days_in_month(year, month) {
        return Err(DateTimeError::OutOfRange { field: "day" });
    }
    let days = days_from_civil(year, month, day);
    if cursor.is_done() {
        return Ok(whole_days(days, days + 1));
    }

    cursor.expect(b'T', "'T' before the time")?;
    let time = parse_time(&mut cursor, rules)?;
    let offset_seconds = parse_time_zone(&mut cursor, rules)?;
    if !cursor.is_done() {
        return Err(cursor.malformed("the end of the value"));
    }

    let seconds = days * SECONDS_PER_DAY + time.seconds_of_day - offset_seconds;
    let start = i128::from(seconds) * NANOS_PER_SECOND + time.nanos;
    Ok(DateRange {
        start,
        end: start + time.precision_nanos,
    })
}

fn whole_days(first_day: i64, day_after_last: i64) -> DateRange {
    let nanos_per_day = i128::from(SECONDS_PER_DAY) * NANOS_PER_SECOND;
    DateRange {
        start: i128::from(first_day) * nanos_per_day,
        end: i128::from(day_after_last) * nanos_per_day,
    }
}

/// Time of day read from `hh:mm[:ss[.fraction]]`.
struct TimeOfDay {
    seconds_of_day: i64,
    nanos: i128,
    /// Width of the range that the written precision leaves open.
    precision_nanos: i128,
}

fn parse_time(cursor: &mut Cursor<'_>, rules: Rules) -> Result<TimeOfDay, DateTimeError> {
    let hour = cursor.digits(2, "a two-digit hour")?;
    if hour > 23 {
        return Err(DateTimeError::OutOfRange { field: "hour" });
    }
    cursor.expect(b':', "':' after the hour")?;
    let minute = cursor.digits(2, "two-digit minutes")?;
    if minute > 59 {
        return Err(DateTimeError::OutOfRange { field: "minute" });
    }
    let seconds_of_minutes = i64::from(hour) * 3600 + i64::from(minute) * 60;

    if !cursor.accept(b':') {
        if rules.require_seconds {
            return Err(DateTimeError::MissingSeconds);
        }
        return Ok(TimeOfDay {
            seconds_of_day: seconds_of_minutes,
            nanos: 0,
            precision_nanos: 60 * NANOS_PER_SECOND,
        });
    }

    let second = cursor.digits(2, "two-digit seconds")?;
    if second > 60 {
        return Err(DateTimeError::OutOfRange { field: "second" });
    }
    // NOTE: FHIR allows a leap second (60). Unix time has none, so it maps onto second 59 of
    // the same minute rather than spilling into the next minute.
    let second = second.min(59);

    let (nanos, precision_nanos) = if cursor.accept(b'.') {
        parse_fraction(cursor)?
    } else {
        (0, NANOS_PER_SECOND)
    };
    Ok(TimeOfDay {
        seconds_of_day: seconds_of_minutes + i64::from(second),
        nanos,
        precision_nanos,
    })
}

/// Reads the digits after the decimal point and returns the nanoseconds they give and the width
/// of their last digit. Digits past the ninth are checked and dropped, leaving a 1 ns range.
fn parse_fraction(cursor: &mut Cursor<'_>) -> Result<(i128, i128), DateTimeError> {
    let mut nanos = 0i128;
    let mut precision_nanos = NANOS_PER_SECOND;
    let mut digit_count = 0usize;
    while let Some(byte @ b'0'..=b'9') = cursor.peek() {
        if digit_count < 9 {
            precision_nanos /= 10;
            nanos += i128::from(byte - b'0') * precision_nanos;
        }
        digit_count += 1;
        cursor.position += 1;
    }
    if digit_count == 0 {
        return Err(cursor.malformed("a digit after the decimal point"));
    }
    Ok((nanos, precision_nanos))
}

/// Reads `Z` or `+hh:mm` / `-hh:mm` and returns the offset east of UTC in seconds.
fn parse_time_zone(cursor: &mut Cursor<'_>, rules: Rules) -> Result<i64, DateTimeError> {
    let sign = match cursor.peek() {
        None if rules.require_time_zone => return Err(DateTimeError::MissingTimeZone),
        None => return Ok(0),
        Some(b'Z') => {
            cursor.position += 1;
            return Ok(0);
        }
        Some(b'+') => 1,
        Some(b'-') => -1,
        Some(_) => return Err(cursor.malformed("a time zone offset such as 'Z' or '+02:00'")),
    };
    cursor.position += 1;

    let hours = cursor.digits(2, "two-digit offset hours")?;
    cursor.expect(b':', "':' inside the time zone offset")?;
    let minutes = cursor.digits(2, "two-digit offset minutes")?;
    let within_fhir_limit = hours < 14 || (hours == 14 && minutes == 0);
    if minutes > 59 || !within_fhir_limit {
        return Err(DateTimeError::OutOfRange {
            field: "time zone offset",
        });
    }
    Ok(sign * (i64::from(hours) * 3600 + i64::from(minutes) * 60))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: i128 = NANOS_PER_SECOND;
    const DAY: i128 = 86_400 * NANOS_PER_SECOND;

    fn day_start(year: i64, month: u32, day: u32) -> i128 {
        i128::from(days_from_civil(year, month, day)) * DAY
    }

    #[test]
    fn days_from_civil_known_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(1969, 12, 31), -1);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(2012, 6, 15), 15_506);
        assert_eq!(days_from_civil(1, 1, 1), -719_162);
        assert_eq!(days_from_civil(9999, 12, 31), 2_932_896);
    }

    #[test]
    fn days_from_civil_counts_consecutively() {
        let mut expected = days_from_civil(1899, 1, 1);
        for year in 1899..=2101 {
            for month in 1..=12 {
                for day in 1..=days_in_month(year, month) {
                    assert_eq!(
                        days_from_civil(year, month, day),
                        expected,
                        "{year}-{month}-{day}"
                    );
                    expected += 1;
                }
            }
        }
    }

    #[test]
    fn leap_years_follow_gregorian_rules() {
        assert!(is_leap_year(2012));
        assert!(is_leap_year(2000));
        assert!(!is_leap_year(1900));
        assert!(!is_leap_year(2013));
        assert_eq!(days_in_month(2012, 2), 29);
        assert_eq!(days_in_month(1900, 2), 28);
        assert_eq!(days_in_month(2012, 13), 0);
    }

    #[test]
    fn year_covers_whole_year() {
        let range = parse_fhir_date_time("2012").unwrap();
        assert_eq!(range.start, day_start(2012, 1, 1));
        assert_eq!(range.end, day_start(2013, 1, 1));
    }

    #[test]
    fn month_covers_whole_month() {
        let june = parse_fhir_date_time("2012-06").unwrap();
        assert_eq!(june.start, day_start(2012, 6, 1));
        assert_eq!(june.end, day_start(2012, 7, 1));

        let december = parse_fhir_date_time("2012-12").unwrap();
        assert_eq!(december.end, day_start(2013, 1, 1));

        let leap_february = parse_fhir_date_time("2012-02").unwrap();
        assert_eq!(leap_february.duration_nanos(), 29 * DAY);
    }

    #[test]
    fn date_covers_one_utc_day() {
        let range = parse_fhir_date_time("2012-06-15").unwrap();
        assert_eq!(range.start, day_start(2012, 6, 15));
        assert_eq!(range.end, day_start(2012, 6, 16));
    }

    #[test]
    fn date_time_applies_offset() {
        let range = parse_fhir_date_time("2012-06-15T10:30:00+02:00").unwrap();
        let expected = day_start(2012, 6, 15) + (8 * 3600 + 30 * 60) * SECOND;
        assert_eq!(range.start, expected);
        assert_eq!(range.end, expected + SECOND);

        let western = parse_fhir_date_time("2012-06-15T23:30:00-05:00").unwrap();
        let next_day = day_start(2012, 6, 16) + (4 * 3600 + 30 * 60) * SECOND;
        assert_eq!(western.start, next_day);
    }

    #[test]
    fn fraction_narrows_range() {
        let millis = parse_fhir_date_time("2012-06-15T10:30:00.123Z").unwrap();
        let second = day_start(2012, 6, 15) + (10 * 3600 + 30 * 60) * SECOND;
        assert_eq!(millis.start, second + 123_000_000);
        assert_eq!(millis.duration_nanos(), 1_000_000);

        let long = parse_fhir_date_time("2012-06-15T10:30:00.1234567891234Z").unwrap();
        assert_eq!(long.start, second + 123_456_789);
        assert_eq!(long.duration_nanos(), 1);
    }

    #[test]
    fn leap_second_maps_to_second_fifty_nine() {
        let leap = parse_fhir_date_time("2016-12-31T23:59:60Z").unwrap();
        let last = parse_fhir_date_time("2016-12-31T23:59:59Z").unwrap();
        assert_eq!(leap, last);
    }

    #[test]
    fn extreme_offsets_accepted() {
        assert!(parse_fhir_date_time("2012-06-15T10:30:00+14:00").is_ok());
        assert!(parse_fhir_date_time("2012-06-15T10:30:00-13:59").is_ok());
        assert_eq!(
            parse_fhir_date_time("2012-06-15T10:30:00+14:30"),
            Err(DateTimeError::OutOfRange {
                field: "time zone offset"
            })
        );
    }

    #[test]
    fn resource_time_needs_zone_and_seconds() {
        assert_eq!(
            parse_fhir_date_time("2012-06-15T10:30:00"),
            Err(DateTimeError::MissingTimeZone)
        );
        assert_eq!(
            parse_fhir_date_time("2012-06-15T10:30Z"),
            Err(DateTimeError::MissingSeconds)
        );
    }

    #[test]
    fn search_date_allows_minutes_without_zone() {
        let minute = parse_search_date("2012-06-15T10:30").unwrap();
        let expected = day_start(2012, 6, 15) + (10 * 3600 + 30 * 60) * SECOND;
        assert_eq!(minute.start, expected);
        assert_eq!(minute.duration_nanos(), 60 * SECOND);

        let second = parse_search_date("2012-06-15T10:30:00").unwrap();
        assert_eq!(second.start, expected);
        assert_eq!(second.duration_nanos(), SECOND);

        let zoned = parse_search_date("2012-06-15T10:30+01:00").unwrap();
        assert_eq!(zoned.start, expected - 3600 * SECOND);
    }

    #[test]
    fn impossible_dates_rejected() {
        let cases = [
            ("2013-02-29", "day"),
            ("2012-02-30", "day"),
            ("2012-04-31", "day"),
            ("2012-00-10", "month"),
            ("2012-13", "month"),
            ("0000", "year"),
            ("2012-06-15T24:00:00Z", "hour"),
            ("2012-06-15T10:60:00Z", "minute"),
            ("2012-06-15T10:30:61Z", "second"),
        ];
        for (text, field) in cases {
            assert_eq!(
                parse_fhir_date_time(text),
                Err(DateTimeError::OutOfRange { field }),
                "{text}"
            );
        }
        assert!(parse_fhir_date_time("1900-02-29").is_err());
        assert!(parse_fhir_date_time("2000-02-29").is_ok());
    }

    #[test]
    fn malformed_values_are_errors() {
        let cases = [
            "12",
            "2012-6",
            "2012-06-1",
            "2012/06/15",
            "20120615",
            "2012-06-15T",
            "2012-06-15T10",
            "2012-06-15 10:30:00Z",
            "2012-06-15T10:30:00.Z",
            "2012-06-15T10:30:00+0200",
            "2012-06-15T10:30:00Zjunk",
            "2012-06-15Z",
            "-2012",
            "２０１２",
            "2012-06-15T10:30:00+02:00:00",
        ];
        for text in cases {
            assert!(
                matches!(
                    parse_fhir_date_time(text),
                    Err(DateTimeError::Malformed { .. })
                ),
                "{text}"
            );
        }
        assert_eq!(parse_fhir_date_time(""), Err(DateTimeError::Empty));
    }

    #[test]
    fn malformed_error_names_position() {
        let error = parse_fhir_date_time("2012-06-1x").unwrap_err();
        assert_eq!(
            error,
            DateTimeError::Malformed {
                position: 9,
                expected: "a two-digit day"
            }
        );
        assert_eq!(
            error.to_string(),
            "invalid date: expected a two-digit day at character 9"
        );
    }

    #[test]
    fn period_spans_both_precisions() {
        let period = parse_period(Some("2012-03"), Some("2012-04-15")).unwrap();
        assert_eq!(period.start, day_start(2012, 3, 1));
        assert_eq!(period.end, day_start(2012, 4, 16));
    }

    #[test]
    fn period_open_ends_are_unbounded() {
        let ongoing = parse_period(Some("2012-03-01"), None).unwrap();
        assert_eq!(ongoing.end, DateRange::UNBOUNDED_END);

        let no_start = parse_period(None, Some("2012")).unwrap();
        assert_eq!(no_start.start, DateRange::UNBOUNDED_START);

        let open = parse_period(None, None).unwrap();
        assert!(open.contains(&parse_fhir_date_time("9999-12-31").unwrap()));
    }

    #[test]
    fn reversed_period_rejected() {
        assert_eq!(
            parse_period(Some("2012-06-16"), Some("2012-06-15")),
            Err(DateTimeError::ReversedPeriod)
        );
        assert!(parse_period(Some("2012-06-15T10:00:00Z"), Some("2012-06-15")).is_ok());
    }

    #[test]
    fn range_relations() {
        let year = parse_fhir_date_time("2012").unwrap();
        let day = parse_fhir_date_time("2012-06-15").unwrap();
        let next_year = parse_fhir_date_time("2013").unwrap();
        assert!(year.contains(&day));
        assert!(!day.contains(&year));
        assert!(year.overlaps(&day));
        assert!(!year.overlaps(&next_year));
        assert!(DateRange::at_instant(day.start).overlaps(&day));
    }
}
