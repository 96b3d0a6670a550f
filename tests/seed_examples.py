"""The seed documents' own example requests, copied verbatim (only the host changes).

Generated from the five tracking API documents the agent implements; do not tidy them: several are not strict
JSON, exactly as the documents print them.
"""

from __future__ import annotations

METAROUTER_AUTH = 'Basic SUxvdmVEYXRhMTIz'

METAROUTER_IDENTIFY = """\
{
  'userId': '1234qwerty',
  'traits': {
    'name': 'Arthur Dent',
    'email': 'earthling1@hitchhikersguide.com',
    'hasTowel': True,
  }
  'timestamp': '2015-11-10T00:45:23.412Z',
  'type': identify
}"""

METAROUTER_TRACK = """\
{
  'userId': '1234qwerty',
  'event': 'Added File', 
  'properties': {
    'fileTitle': 'Life, the Universe, and Everything',
    'fileSize': '42kb',
    'fileType': 'PDF'
  },
  'timestamp': '2015-11-10T00:45:23.412Z'
  'type': track
}"""

METAROUTER_PAGE = """\
{
  'userId': '1234qwerty',
  'section': 'Blog',
  'name': '10 Questions with Marvin, the clinically depressed robot',
  'properties': {
    'referrer': 'http://reddit.com/r/AMA'
  }
  'type': page
}"""

METAROUTER_GROUP = """\
{
  'userId': '1234qwerty',
  'groupId': '5678dvorak',
  'traits': {
    'name': 'The Hitchhikers',
    'relativePosition': '[39.1000 N, 84.5167 W]'
    }
  'type': group
}"""

METAROUTER_ALIAS = """\
{
  "previousId": "anonymous_id",
  "userId": "assigned_id_or_email",
  "timestamp": "2015-11-10T00:45:23.412Z"
  "type": alias
}"""

METAROUTER_BATCH = """\
{
  "batch": [
	  {
		  "anonymousId": "cf09e649-fd0b-46b6-9fc1-53ab9cd05c47",
		  "messageId": "317b11a8-8cd3-40ad-b3fb-622835c42cfd",
		  "sentAt": "2020-03-02T18:29:53.661Z",
		  "timestamp": "2020-03-02T18:29:27.333Z",
		  "type": "track",
		  "writeKey": "test1",
		  "event": "example 1 event"
	  },
	  {
		  "anonymousId": "cf09e649-fd0b-46b6-9fc1-53ab9cd05c47",
		  "messageId": "317b11a8-8cd3-40ad-b3fb-123d417b11a8",
		  "sentAt": "2020-03-02T18:29:53.661Z",
		  "timestamp": "2020-03-02T18:29:27.333Z",
		  "type": "track",
		  "writeKey": "test1",
		  "event": "example 1 event"
	  }
  ],
  "context": {
    "page": {
      "path": "/mycart/home",
      "referrer": "https://www.example.com/",
      "title": "Example - Shopping Cart",
      "url": "https://www.example.com/mycart/home"
    },
    "userAgent": "Mozilla/5.0 (Windows NT 6.1; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/80.0.3987.122 Safari/537.36"
  },
  "integrations": {
    "All": false,
    "Mixpanel": true
  }
}"""

METAROUTER_PIXEL_PAYLOAD = """\
{
    "integrations": {},
    "context": {
        "page": {
            "path": "/home"
        },
        "library": {
            "name": "analytics.js",
            "version": "3.2.21"
        }
    },
    "event": "example event",
    "messageId": "1234567890",
    "type": "track",
    "writeKey": "example",
    "userId": "0987654321"
}"""

METAROUTER_PIXEL_PATH = '/v1/pixel/track?data=ewogICAgImludGVncmF0aW9ucyI6IHt9LAogICAgImNvbnRleHQiOiB7CiAgICAgICAgInBhZ2UiOiB7CiAgICAgICAgICAgICJwYXRoIjogIi9ob21lIgogICAgICAgIH0sCiAgICAgICAgImxpYnJhcnkiOiB7CiAgICAgICAgICAgICJuYW1lIjogImFuYWx5dGljcy5qcyIsCiAgICAgICAgICAgICJ2ZXJzaW9uIjogIjMuMi4yMSIKICAgICAgICB9CiAgICB9LAogICAgImV2ZW50IjogImV4YW1wbGUgZXZlbnQiLAogICAgIm1lc3NhZ2VJZCI6ICIxMjM0NTY3ODkwIiwKICAgICJ0eXBlIjogInRyYWNrIiwKICAgICJ3cml0ZUtleSI6ICJleGFtcGxlIiwKICAgICJ1c2VySWQiOiAiMDk4NzY1NDMyMSIKfQ=='

METAROUTER_WEBHOOK_PATH = '/v1/webhook?writeKey=abcdefg'

METAROUTER_BATCH_ERROR = """\
{
    "Success": false,
    "Errors": [
      {
        "Error" : "Bad Request",
        "Message":"Error reading request body",
        "Details":"HTTP request too large"
      }
    ]
}"""

METAROUTER_ERROR = """\
{
    "Error": "Bad Request",
    "Message": "Invalid or missing writekey",
    "Details": ""
}"""

CAPTURE_KEYS = ('your_write_key_here', 'your_write_key')

CAPTURE_BODY = """\
{
"batch": [
{
"type": "track",
"event": "Order Completed",
"userId": "user_123",
"timestamp": "2026-01-20T06:30:00.000Z",
"properties": {
"order_id": "ord_456",
"total": 99.99,
"currency": "USD"
},
"context": {
"channel": "web"
}
}
]
}"""

CAPTURE_CURL = """\
{
"batch": [{
"type": "track",
"event": "Order Completed",
"userId": "user_123",
"properties": { "total": 99.99 }
}]
}"""

CAPTURE_TRACK = """\
{
"type": "track",
"event": "Button Clicked",
"userId": "user_123",
"anonymousId": "anon_456",
"timestamp": "2026-01-20T06:30:00.000Z",
"properties": {
"button_id": "signup",
"color": "blue"
}
}"""

CAPTURE_PAGE = """\
{
"type": "page",
"name": "Home",
"userId": "user_123",
"timestamp": "2026-01-20T06:30:00.000Z",
"context": {
"page": {
"path": "/",
"url": "https://example.com/",
"title": "Home | My App"
}
}
}"""

CAPTURE_IDENTIFY = """\
{
"type": "identify",
"userId": "user_123",
"anonymousId": "anon_456",
"timestamp": "2026-01-20T06:30:00.000Z",
"traits": {
"email": "user@example.com",
"name": "John Doe",
"plan": "premium"
}
}"""

SEGMENTSTREAM_AUTH = 'Basic YWJjMTIzOg=='

SEGMENTSTREAM_TRACK = """\
{
  "hitId": "4c59d330-35c7-11e9-8f27-8d1d7d4690e7",
  "sentAt": "2019-02-21T10:56:10.723Z",
  "event": {
    "category": "Auth",
    "name": "Registered",
    "label": "some label",
    "user": {
      "anonymousId": "80ddb140-35c6-11e9-bd56-eb1c05e6de18",
      "emailHash": "eff8c37862c7a2f0019448289bdd0869c30ae7f07060e4be9d",
      "userId": "u2783187492",
      "firstName": "John",
      "lastName": "Doe"
    },
    "nonInteraction": false
  },
  "context": {
    "ip": "123.22.334.55"
  }
}"""

TRANTHOR_HEADERS = {'Content-Type': 'application/json', 'PublicWriteKey': '<api-key>', 'authorization': '<authorization>'}

TRANTHOR_CURL = """\
{
  "messageId": "msg_0a1b2c3d-4e5f-6a7b-8c9d-0e1f2a3b4c5d",
  "timestamp": "2025-07-15T10:30:00.000Z",
  "files": [
    {
      "type": "Base64Encoded",
      "name": "<string>",
      "mimeType": "<string>",
      "data": "<string>"
    }
  ],
  "context": {
    "userAgent": "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/103.0.0.0 Safari/537.36",
    "locale": "en-GB"
  },
  "event": "PRODUCT_VIEWED",
  "properties": {
    "productId": "prod_123xyz",
    "productName": "Tranthor SuperWidget",
    "category": "Widgets",
    "price": 29.99,
    "currency": "USD"
  },
  "userId": "usr_a1b2c3d4e5f6"
}"""

TRANTHOR_EXAMPLE_BODY = """\
{
  "event": "Signed Up",
  "userId": "1043",
  "properties": {
    "plan": "Enterprise"
  },
  "messageId": "1ff51c9c-4929-45de-8914-3bb878be8c4a"
}"""

CAPTURE_PYTHON = """\
import requests
url = "https://analytics.chatnationbot.com/v1/capture"
headers = {
"Content-Type": "application/json",
"X-Write-Key": "your_write_key"
}
payload = {
"batch": [{
"type": "track",
"event": "Order Completed",
"userId": "user_123",
"properties": {"total": 99.99}
}]
}
response = requests.post(url, json=payload, headers=headers)
print(response.status_code)"""

CAPTURE_NODE = """\
const response = await fetch(
"https://analytics.chatnationbot.com/v1/capture",
{
method: "POST",
headers: {
"Content-Type": "application/json",
"X-Write-Key": "your_write_key"
},
body: JSON.stringify({
batch: [{
type: "track",
event: "Order Completed",
userId: "user_123",
properties: { total: 99.99 }
}]
})
}
);"""
